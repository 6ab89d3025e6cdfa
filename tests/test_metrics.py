import colour
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from training import metrics


def _hwc(t):
    return t.permute(1, 2, 0).double().numpy()


@pytest.fixture(scope="module")
def pairs(photo_crops, taef2):
    with torch.no_grad():
        recon = taef2.decode(taef2.encode(photo_crops))
    noisy = (photo_crops + 0.03 * torch.randn(photo_crops.shape, generator=torch.Generator().manual_seed(0))).clamp(
        0, 1
    )
    return [(recon, photo_crops), (noisy, photo_crops)]


def test_psnr_matches_scikit_image(pairs):
    for out, ref in pairs:
        ours = metrics.psnr(out, ref)
        for i in range(out.shape[0]):
            expected = peak_signal_noise_ratio(_hwc(ref[i]), _hwc(out[i].clamp(0, 1)), data_range=1.0)
            assert float(ours[i]) == pytest.approx(expected, abs=1e-3)


def test_ssim_matches_scikit_image(pairs):
    for out, ref in pairs:
        ours = metrics.ssim(out, ref)
        for i in range(out.shape[0]):
            expected = structural_similarity(
                _hwc(out[i].clamp(0, 1)),
                _hwc(ref[i]),
                data_range=1.0,
                channel_axis=-1,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            assert float(ours[i]) == pytest.approx(expected, abs=1e-5)


def test_delta_e_matches_colour_science(pairs):
    out, ref = pairs[0]
    ours = metrics.delta_e(out, ref)
    lab_out = colour.convert(out.clamp(0, 1).permute(0, 2, 3, 1).double().numpy(), "sRGB", "Oklab")
    lab_ref = colour.convert(ref.permute(0, 2, 3, 1).double().numpy(), "sRGB", "Oklab")
    expected = np.sqrt(((lab_out - lab_ref) ** 2).sum(-1)).mean(axis=(1, 2))
    # photos contain a few pixels in the cube-root toe (sRGB codes 0-3), where our curve is deliberately
    # flatter than the true cube root; they move the mean by far less than a just-visible step (0.02).
    assert np.allclose(ours.numpy(), expected, atol=1e-3)


def _blur_reference(x):
    """[1,4,6,4,1]/16 separable blur with numpy's 'reflect' padding, written independently."""
    k = np.array([1, 4, 6, 4, 1]) / 16
    p = np.pad(x, ((0, 0), (2, 2), (2, 2)), mode="reflect")
    rows = sum(k[i] * p[:, :, i : i + x.shape[2]] for i in range(5))
    return sum(k[i] * rows[:, i : i + x.shape[1], :] for i in range(5))


def test_detail_ratio_matches_definition_and_direction(photo_crops):
    ref = photo_crops[:2]
    blurred = torch.nn.functional.avg_pool2d(ref, 3, stride=1, padding=1, count_include_pad=False)
    noisy = (ref + 0.05 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    for out in (blurred, noisy):
        ours = metrics.detail_ratio(out, ref)
        for i in range(2):
            y, x = out[i].clamp(0, 1).double().numpy(), ref[i].double().numpy()
            expected = ((y - _blur_reference(y)) ** 2).mean() / ((x - _blur_reference(x)) ** 2).mean()
            assert float(ours[i]) == pytest.approx(expected, rel=1e-4)
    assert (metrics.detail_ratio(blurred, ref) < 0.9).all()
    assert (metrics.detail_ratio(noisy, ref) > 1.1).all()
    assert torch.allclose(metrics.detail_ratio(ref, ref), torch.ones(2))


def test_detail_ratio_of_flat_reference_is_nan():
    flat = torch.full((1, 3, 16, 16), 0.5)
    assert torch.isnan(metrics.detail_ratio(torch.rand(1, 3, 16, 16), flat)).all()


def test_output_is_clamped_before_measuring(photo_crops):
    ref = photo_crops[:1]
    overshoot = ref.clone()
    overshoot[ref > 0.9] = 1.5
    assert float(metrics.psnr(overshoot, ref)) > float(metrics.psnr(ref * 0 + 1.5, ref))
    assert float(metrics.psnr(overshoot, ref)) == pytest.approx(float(metrics.psnr(overshoot.clamp(0, 1), ref)))


def test_all_metrics_and_mean_std(pairs):
    out, ref = pairs[0]
    values = metrics.reconstruction_metrics(out, ref, {"alex": None})
    assert set(values) == {"psnr", "ssim", "delta_e", "detail_ratio"}
    mean, std = metrics.mean_and_std(values["psnr"])
    assert mean == pytest.approx(float(values["psnr"].double().mean()))
    assert std == pytest.approx(float(values["psnr"].double().std(unbiased=False)), abs=1e-9)


def test_error_split_shares_sum_to_one(pairs):
    split = metrics.oklab_error_split(*pairs[0])
    assert split["share_L"] + split["share_a"] + split["share_b"] == pytest.approx(1.0)
    assert split["mean_abs_L"] > 0


def test_delta_e_distribution_matches_numpy():
    values = torch.rand(2, 30, 40)
    got = metrics.delta_e_distribution(values)
    flat = values.flatten().numpy()
    assert got["mean_delta_e"] == pytest.approx(float(flat.mean()), rel=1e-6)
    assert got["p95_delta_e"] == pytest.approx(float(np.percentile(flat, 95)), abs=2e-3)
    assert got["median_delta_e"] == pytest.approx(float(np.median(flat)), abs=1e-3)
