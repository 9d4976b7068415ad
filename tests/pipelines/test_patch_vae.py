"""PatchPCAAutoencoder: exact on its own span, a real PCA, WanPipeline's vae contract, save/load round trip."""

import pytest
import torch

from vdit_sparse.pipelines.patch_vae import PatchPCAAutoencoder


def test_fit_finds_the_principal_subspace_and_decodes_it_exactly():
    torch.manual_seed(0)
    vae = PatchPCAAutoencoder(z_dim=4, patch_size=4, patch_frames=1)  # one frame per patch: no first-frame padding
    dim = 3 * 1 * 4 * 4
    basis = torch.linalg.qr(torch.randn(dim, 4)).Q.T  # (4, dim) a planted 4-d subspace
    mean = torch.randn(dim) * 0.1

    def video(n):  # (n, 3, 3, 8, 8): 3 latent frames x 2 x 2 patches, every patch in mean + span(basis)
        coef = torch.randn(n, 3, 2, 2, 4) * torch.tensor([3.0, 2.0, 1.0, 0.5])
        return vae._video(coef @ basis + mean)

    info = vae.fit([video(8), video(8)])
    assert info["variance_kept"] == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(vae.components @ vae.components.T, torch.eye(4), atol=1e-5)  # orthonormal rows
    x = video(2) * 0.2
    x = vae._video(vae._patches(x) + vae.patch_mean * 0.8)  # mean + 0.2 x span: still inside the decoder's [-1, 1]
    assert x.abs().max() < 1
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (2, 4, 3, 2, 2)
    assert torch.allclose(vae.decode(z).sample, x, atol=1e-4)
    stds = z.transpose(0, 1).flatten(1).std(1)
    assert stds[0] > stds[-1]  # components in order of variance
    assert vae.config.latents_std == [info["latents_std"]] * 4  # one scale for every channel


def test_first_frame_has_its_own_latent_frame_and_sizes_are_checked():
    vae = PatchPCAAutoencoder(z_dim=16, patch_size=8, patch_frames=4)
    x = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (1, 16, 3, 2, 3)  # (9 - 1) / 4 + 1 latent frames
    assert vae.decode(z).sample.shape == x.shape
    with pytest.raises(ValueError, match=r"video of shape \(1, 3, 8, 16, 24\): need 3 channels, 4k \+ 1 frames"):
        vae.encode(x[:, :, :8])
    with pytest.raises(ValueError, match=r"latents of shape .*: need \(B, 16, T', H', W'\)"):
        vae.decode(z[:, :8])
    with pytest.raises(ValueError, match="z_dim=0"):
        PatchPCAAutoencoder(z_dim=0)


def test_save_and_load_round_trip(tmp_path):
    vae = PatchPCAAutoencoder(z_dim=8, patch_size=4, patch_frames=2)
    vae.fit([torch.rand(2, 3, 5, 8, 8) * 2 - 1])
    vae.save_pretrained(tmp_path)
    back = PatchPCAAutoencoder.from_pretrained(tmp_path)
    assert torch.equal(back.components, vae.components) and torch.equal(back.patch_mean, vae.patch_mean)
    assert back.config.latents_std == vae.config.latents_std and back.config.scale_factor_spatial == 4
