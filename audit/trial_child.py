"""The child process of audit.trial: cap itself, then load a model file and run one image, as the server would.

Run as `python -m audit.trial_child <file> <name shown> <bytes> <cpu seconds>`; prints one JSON verdict line.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from audit import limits
from audit.errors import AuditError, UnsafeModelError
from audit.trial import gib


def _vm_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def verdict(path: str, shown: str, budget: int, cpu: int) -> dict:
    """In the child: cap this process, then load the file and run one image, as the server would."""
    from audit import models  # imports TensorFlow first: the cap starts from a process that holds it

    address_space = _vm_bytes() + budget
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    try:
        loaded = models.load(f"file:{path}")
    except AuditError as exc:
        return {"ok": False, "message": str(exc).replace(Path(path).name, shown),
                "unsafe": isinstance(exc, UnsafeModelError)}
    except MemoryError:
        return {"ok": False, "message": f"{shown}: its first load and pass needed more than {gib(budget)} of memory "
                                        f"beyond what a loaded model starts from ({limits.TRIAL_BYTES.variable}); "
                                        "refused."}
    except Exception as exc:  # noqa: BLE001 (any failure of a stranger's file is a refusal, said in a sentence)
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        if "OOM" in text or "ResourceExhausted" in type(exc).__name__ or "alloc" in text.lower():
            return {"ok": False, "message": f"{shown}: its first load and pass needed more than {gib(budget)} of "
                                            f"memory beyond what a loaded model starts from "
                                            f"({limits.TRIAL_BYTES.variable}); refused."}
        return {"ok": False, "message": f"{shown} could not be loaded and run as a Keras model "
                                        f"({type(exc).__name__}: {text})."}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"ok": True, "parameters": int(loaded.model.count_params()), "peak_bytes": usage.ru_maxrss * 1024,
            "activation_bytes": loaded.cost.activation_bytes, "macs": loaded.cost.macs}


if __name__ == "__main__":
    print(json.dumps(verdict(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))), flush=True)
