import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from edge_agent.train.nets import AE, VAE, encoder_sizes


@pytest.mark.parametrize("p, sizes", [(16, [16, 8, 4]), (28, [28, 14, 7, 3]), (32, [32, 16, 8, 4]),
                                      (96, [96, 48, 24, 12, 6, 3]), (200, [200, 100, 50, 25, 12, 6])])
def test_depth_adapts_to_patch_size(p, sizes):
    assert encoder_sizes(p) == sizes


@pytest.mark.parametrize("p", [16, 17, 28, 33, 96])
@pytest.mark.parametrize("family", [VAE, AE])
def test_any_patch_size_round_trips(family, p):
    m = torch.jit.script(family(2, p, 4, 3).eval())
    x = torch.rand(2, 2, p, p)
    assert m(x).shape == (2,)
    assert m.pixel_map(x).shape == (2, p, p)
    assert set(m.scores(x)) == set(m.score_names)


def test_patch_size_too_small_is_explained():
    with pytest.raises(ValueError, match=">= 16"):
        encoder_sizes(11)


def test_vae_scores_match_hand_computation():
    torch.manual_seed(0)
    vae = VAE(1, 16, 4, 3).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        mu_z, logvar_z = vae.encode(x)
        mu_x, sigma_x = vae.decode(mu_z)
        got = torch.jit.script(vae).scores(x)
    mu_z, lv, mu_x, sx, xx = (t.double().numpy() for t in (mu_z, logvar_z, mu_x, sigma_x, x))
    for n in range(2):
        d = sum(0.5 * (-lv[n, j] - 1 + math.exp(lv[n, j]) + mu_z[n, j] ** 2) for j in range(3))
        a = sum(0.5 * math.log(2 * math.pi * s * s) for s in sx[n].ravel())
        m = sum(0.5 * (mu - v) ** 2 / s**2 for mu, v, s in zip(mu_x[n].ravel(), xx[n].ravel(), sx[n].ravel()))
        assert got["d"][n].item() == pytest.approx(d, rel=1e-4)
        assert got["a"][n].item() == pytest.approx(a, rel=1e-4, abs=1e-3)
        assert got["m"][n].item() == pytest.approx(m, rel=1e-4)
        assert got["elbo"][n].item() == pytest.approx(d + a + m, rel=1e-4, abs=1e-3)


def test_vae_m_is_the_default_and_sigma_has_a_floor():
    vae = torch.jit.script(VAE(1, 16, 4, 3, sigma_min=0.05).eval())
    x = torch.rand(3, 1, 16, 16)
    assert vae.default_score == "m"
    torch.testing.assert_close(vae(x), vae.scores(x)["m"])
    torch.testing.assert_close(vae.score(x, "elbo"), vae.scores(x)["elbo"])
    torch.testing.assert_close(vae.pixel_map(x).flatten(1).sum(1), vae(x))


def _ssim_numpy(x, y):
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    f = lambda a: scipy.ndimage.correlate(a, w, mode="constant", cval=0.0)
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))


def test_ae_scores_match_hand_computation():
    torch.manual_seed(0)
    ae = AE(1, 16, 4, 3).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        xh = ae.reconstruct(x)
        got = torch.jit.script(ae).scores(x)
    xn, hn = x.double().numpy(), xh.double().numpy()
    for n in range(2):
        diff = hn[n, 0] - xn[n, 0]
        assert got["l2"][n].item() == pytest.approx((diff**2).mean(), rel=1e-5)
        assert got["l1"][n].item() == pytest.approx(np.abs(diff).sum(), rel=1e-5)
        assert got["ssim"][n].item() == pytest.approx(1 - _ssim_numpy(xn[n, 0], hn[n, 0]).mean(), rel=1e-4)


def test_ssim_of_identical_patches_is_zero():
    ae = AE(1, 16, 4, 3).eval()
    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(1 - ae.ssim_map(x, x).flatten(1).mean(1), torch.zeros(2), atol=1e-6)


def _randomise_batchnorm(model):
    """Trained-like BatchNorm statistics, so folding and the rewrite are tested on more than identity BNs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


@pytest.mark.parametrize("h, w, output_padding", [(3, 3, 0), (3, 3, 1), (6, 6, 0), (7, 7, 1), (5, 8, 0), (4, 9, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_subpixel_conv_equals_the_transposed_conv(h, w, output_padding, channels_last, bias):
    from edge_agent.train.nets import SubpixelConvTranspose2d

    torch.manual_seed(h * 10 + w)
    deconv = torch.nn.ConvTranspose2d(5, 3, 4, 2, 1, output_padding=output_padding, bias=bias).double()
    x = torch.randn(2, 5, h, w, dtype=torch.double)
    sub = SubpixelConvTranspose2d.from_transposed(deconv)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        want = deconv(x)
        got = sub(x.contiguous(memory_format=fmt))
        relu = SubpixelConvTranspose2d.from_transposed(deconv, relu=True)(x)
    assert got.shape == want.shape == (2, 3, 2 * h + output_padding, 2 * w + output_padding)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # float64: exact up to rounding
    torch.testing.assert_close(relu, torch.relu(want), rtol=1e-12, atol=1e-12)


def test_subpixel_zero_border_hand_off_equals_cropping():
    from edge_agent.train.nets import SubpixelConvTranspose2d

    torch.manual_seed(0)
    first = torch.nn.ConvTranspose2d(6, 4, 4, 2, 1).double()
    second = torch.nn.ConvTranspose2d(4, 2, 4, 2, 1).double()
    x = torch.randn(3, 6, 5, 5, dtype=torch.double)
    a = SubpixelConvTranspose2d.from_transposed(first, relu=True, pad_out=True)
    b = SubpixelConvTranspose2d.from_transposed(second, pad_in=True)
    with torch.no_grad():
        torch.testing.assert_close(b(a(x)), second(torch.relu(first(x))), rtol=1e-12, atol=1e-12)


def test_subpixel_rejects_other_geometry():
    from edge_agent.train.nets import SubpixelConvTranspose2d

    with pytest.raises(ValueError, match="k=4, s=2, p=1"):
        SubpixelConvTranspose2d.from_transposed(torch.nn.ConvTranspose2d(2, 2, 3, 2, 1))


@pytest.mark.parametrize("latent", ["fc", "conv"])
@pytest.mark.parametrize("which", ["output", "all"])
@pytest.mark.parametrize("p", [16, 28, 32, 33, 96])
@pytest.mark.parametrize("family", [VAE, AE])
def test_export_rewrites_score_like_the_original(family, p, which, latent):
    from edge_agent.train.nets import SubpixelConvTranspose2d, fold_decoder_batchnorm, subpixel_decoder

    torch.manual_seed(p)
    model = _randomise_batchnorm(family(1, p, 4, 3, latent=latent))
    rewritten = subpixel_decoder(fold_decoder_batchnorm(model), which)
    subs = [m for m in rewritten.decoder.deconv if isinstance(m, SubpixelConvTranspose2d)]
    deconvs = [m for m in model.decoder.deconv if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(subs) == (1 if which == "output" else len(deconvs))
    scripted = torch.jit.script(rewritten)
    x = torch.rand(4, 1, p, p)
    with torch.no_grad():
        for name in model.score_names:
            want = model.score(x, name)
            got = scripted.score(x.contiguous(memory_format=torch.channels_last), name)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # float32 rounding only
        torch.testing.assert_close(scripted.pixel_map(x), model.pixel_map(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("p, cells", [(28, 9), (32, 16), (64, 16), (96, 36), (200, 144)])
def test_conv_latent_has_nz_channels_per_16px_cell(p, cells):
    from edge_agent.train.nets import latent_cells

    assert latent_cells(p, "fc") == 1
    assert latent_cells(p, "conv") == cells
    vae = VAE(1, p, 4, 3, latent="conv").eval()
    x = torch.rand(2, 1, p, p)
    with torch.no_grad():
        mu_z, logvar_z = vae.encode(x)
        mu_x, sigma_x = vae.decode(mu_z)
    assert vae.nz == 3 * cells and mu_z.shape == logvar_z.shape == (2, 3 * cells)
    assert mu_x.shape == sigma_x.shape == (2, 1, p, p)


def test_conv_latent_code_has_a_place():
    """Each cell's code drives its own part of the patch: changing the code of the top-left cell of a 6x6
    grid (P 96, 16-px cells) changes the top-left of the decoded patch and leaves the far corner as it was."""
    torch.manual_seed(0)
    vae = VAE(1, 96, 4, 2, latent="conv").eval()
    z = torch.randn(1, vae.nz)
    moved = z.clone()
    moved.view(1, 2, 6, 6)[:, :, 0, 0] += 3.0
    with torch.no_grad():
        diff = (vae.decode(moved)[0] - vae.decode(z)[0]).abs()[0, 0]
    assert diff[:16, :16].max() > 1e-3
    assert diff[48:, 48:].max() == 0  # the receptive field of one cell: 3x3 conv + four 4x4/2 deconvs < 48 px


def test_unknown_latent_is_explained():
    from edge_agent.train.nets import latent_sizes

    with pytest.raises(ValueError, match="fc, conv"):
        latent_sizes(96, "grid")
