"""Budgets: what one upload or one image may cost a shared server, set in one place.

Every limit has a default sane for a team server on a 24 GB machine and can be raised (or lowered) by
an environment variable `CNN_AUDIT_<NAME>` (e.g. `CNN_AUDIT_MAX_PARAMETERS=500000000` for a private
server with big models). Each refusal names the limit and the variable, so a user knows what to ask.
Limits are checked before the work: on what a file declares (its config, its zip and HDF5 headers),
never by building or decoding it first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from audit.errors import AuditError


@dataclass(frozen=True)
class Limit:
    name: str
    default: int
    what: str

    @property
    def variable(self) -> str:
        return f"CNN_AUDIT_{self.name.upper()}"

    @property
    def value(self) -> int:
        text = os.environ.get(self.variable)
        try:
            return int(float(text)) if text else self.default
        except ValueError:
            return self.default

    def check(self, amount: float, subject: str, error=AuditError) -> None:
        """Raise `error` naming the limit and how to raise it when `amount` is over it."""
        if amount > self.value:
            raise error(f"{subject}: {_number(amount)} {self.what}, over this server's limit of {_number(self.value)} "
                        f"(set {self.variable} to change it).")


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:g}"


UPLOAD_BYTES = Limit("max_upload_bytes", 200 * 2**20, "bytes")
PARAMETERS = Limit("max_parameters", 200_000_000, "parameters declared by the model's layers")
WEIGHT_BYTES = Limit("max_weight_bytes", 2 * 2**30, "bytes of weights once unpacked")
INPUT_PIXELS = Limit("max_input_pixels", 2048 * 2048, "input pixels per image")
CONFIG_DEPTH = Limit("max_config_depth", 200, "levels of nesting in the model's config")
ARCHIVE_MEMBERS = Limit("max_archive_members", 10_000, "files in the archive")
IMAGE_PIXELS = Limit("max_image_pixels", 50_000_000, "pixels")
ASPECT_RATIO = Limit("max_aspect_ratio", 50, "times longer than wide")
ZIP_IMAGE_BYTES = Limit("max_zip_member_bytes", 256 * 2**20, "bytes once decompressed")
ZIP_TOTAL_PIXELS = Limit("max_zip_pixels", 500_000_000, "pixels in all the archive's images (read from their headers)")
UPLOADS_BYTES = Limit("max_uploads_bytes", 5 * 2**30, "bytes of stored uploads (the oldest unused go first)")
LOADED_MODELS = Limit("max_loaded_models", 4, "models kept loaded (the least recently used go first)")
LOADED_MODEL_BYTES = Limit("max_loaded_model_bytes", 3 * 2**30, "bytes of weights of the models kept loaded")
LINK_JOB_SECONDS = Limit("link_job_seconds", 20, "seconds of estimated work a link may start without a click")
LAYERS = Limit("max_layers", 3000, "layers")
ACTIVATION_BYTES = Limit("max_activation_bytes", 2 * 2**30,
                         "bytes of activations held at once for one image (float32)")
MACS = Limit("max_macs", 100_000_000_000, "multiply-adds for one image")
TRIAL_BYTES = Limit("max_trial_bytes", 2**30,
                    "bytes a new model file's first load may take beyond three times its own size")
TRIAL_CPU_SECONDS = Limit("max_trial_cpu_seconds", 120, "seconds of CPU for a new model file's first load and pass")
BATCH_BYTES = Limit("max_batch_bytes", 2**30, "bytes of activations per batch of a job (the batch is cut to fit)")
IMAGE_SIDE = Limit("max_image_side", 2048, "pixels on the longer side of an image kept for the pages")
SERVER_BYTES = Limit("max_server_bytes", 8 * 2**30, "bytes of activations all sessions' work may hold at once "
                     "(at most 40% of the memory the server may use)")
JPEG_SCANS = Limit("max_jpeg_scans", 100, "scans in one JPEG (a progressive photo has about 10; each scan is "
                   "decoded over the whole image)")

ALL = (UPLOAD_BYTES, PARAMETERS, WEIGHT_BYTES, INPUT_PIXELS, CONFIG_DEPTH, ARCHIVE_MEMBERS, IMAGE_PIXELS,
       ASPECT_RATIO, ZIP_IMAGE_BYTES, ZIP_TOTAL_PIXELS, UPLOADS_BYTES, LOADED_MODELS, LOADED_MODEL_BYTES,
       LINK_JOB_SECONDS, LAYERS, ACTIVATION_BYTES, MACS, TRIAL_BYTES, TRIAL_CPU_SECONDS, BATCH_BYTES, IMAGE_SIDE,
       JPEG_SCANS, SERVER_BYTES)
"""Every limit, for the README's table and the tests."""
