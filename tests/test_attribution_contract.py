"""One map per method, whoever asks (as Xplique's API tests do): the API (attribution.explain), the
dashboard's cached path (pages.attribution_jobs.attribution_map) and the report (report.attribution_maps) give
the same map of the same image, with black baselines and fills that are black pixels."""

import numpy as np
import pytest

from audit import attribution, images, models, report
from audit.zoo import shapes


@pytest.fixture(scope="module")
def case():
    loaded = models.load("demo:shapes-gap")  # [-1, 1] inputs: zeros in input space would be mid-grey
    item = images.LabelledImage("star", shapes.generate(1, seed=7).images[0])
    x = loaded.preprocess(item.pixels)[0]
    black = loaded.preprocess(np.zeros_like(item.pixels))[0]
    target = int(np.argmax(loaded.predict(x[None])[0]))
    return loaded, item, x, black, target


@pytest.mark.parametrize("method", list(attribution.METHODS))
def test_the_api_the_dashboard_and_the_report_give_the_same_map(case, method):
    from pages import attribution_jobs, selection

    loaded, item, x, black, target = case
    api = attribution.explain(loaded, item.pixels, method, target)
    chosen = selection.Selection(model=loaded, image_set=[item], image=item, preprocessing=loaded.preprocessing,
                                 fit="crop", device="/CPU:0")
    page = attribution_jobs.attribution_map(chosen, images.image_hash([x, black]), x, black, ("class", target), method, ())
    in_report = report.attribution_maps(loaded, item, target, report.ReportOptions(methods=(method,)))[method]
    assert api.shape == (64, 64) and np.ptp(api) > 0
    np.testing.assert_allclose(page, api, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(in_report, api, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, option", [("Integrated Gradients", "baseline"), ("Occlusion", "fill"),
                                            ("Score-CAM", "fill")])
def test_black_means_black_pixels_not_zeros_in_the_models_input_space(case, method, option):
    loaded, item, x, black, target = case
    assert black.min() == -1.0  # the tf preprocessing: black pixels are -1, zeros would be grey
    api = attribution.explain(loaded, item.pixels, method, target)
    value = np.full_like(x, -1.0)
    by_hand = attribution.METHODS[method](loaded.model, x, target, **{option: value})
    zeros = attribution.METHODS[method](loaded.model, x, target, **{option: np.zeros_like(x)})
    np.testing.assert_allclose(api, by_hand, rtol=1e-5, atol=1e-6)
    assert not np.allclose(api, zeros, atol=1e-3)
