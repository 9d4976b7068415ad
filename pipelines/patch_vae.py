"""The embedded model's autoencoder: a fixed linear map of space-time patches (patch PCA).

A clip (B, 3, T, H, W) in [-1, 1] with T = 4k + 1 frames is cut into patches of
``patch_frames`` x ``patch_size`` x ``patch_size`` pixels; each patch (a vector of
3 * pt * ps * ps values) is projected on ``z_dim`` orthonormal principal components fitted once on
shapes-world clips. Decoding is the transpose. Like Wan's causal VAE, the first frame gets a latent
frame of its own (it is repeated to fill its patch), so 4k + 1 frames give k + 1 latent frames.

Why not a trained VAE: ``AutoencoderKLWan``'s decoder at this size does not learn within the CPU
budgets this project has (docs/embedded_model.md); a PCA needs no training (``fit`` takes seconds),
keeps colour, position and motion, and decodes in milliseconds.

It is a diffusers ``ModelMixin`` + ``ConfigMixin`` so that ``WanPipeline`` uses it as its ``vae``
(it reads ``config.z_dim``, ``latents_mean``, ``latents_std``, ``scale_factor_temporal`` /
``scale_factor_spatial``) and ``save_pretrained`` / ``from_pretrained`` round-trip it; the
components are buffers, saved with the weights.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

try:
    from diffusers.models.autoencoders.vae import DecoderOutput
except ImportError:  # pragma: no cover - older layouts
    from diffusers.models.autoencoders.autoencoder_kl import DecoderOutput


class PatchPCAAutoencoder(ModelMixin, ConfigMixin):
    """Space-time patches <-> ``z_dim`` principal components; see the module docstring."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        z_dim: int = 64,
        patch_size: int = 16,
        patch_frames: int = 4,
        in_channels: int = 3,
        latents_mean: list | None = None,
        latents_std: list | None = None,
        scale_factor_spatial: int | None = None,  # what WanPipeline reads: always the patch sizes
        scale_factor_temporal: int | None = None,
    ):
        super().__init__()
        dim = in_channels * patch_frames * patch_size * patch_size
        if not 0 < z_dim <= dim:
            raise ValueError(f"z_dim={z_dim}: must be in 1..{dim} (values in one patch)")
        if scale_factor_spatial not in (None, patch_size) or scale_factor_temporal not in (None, patch_frames):
            raise ValueError(f"scale factors ({scale_factor_spatial}, {scale_factor_temporal}): must equal the patch "
                             f"sizes ({patch_size}, {patch_frames})")
        self.register_to_config(
            scale_factor_spatial=patch_size, scale_factor_temporal=patch_frames,
            latents_mean=list(latents_mean) if latents_mean is not None else [0.0] * z_dim,
            latents_std=list(latents_std) if latents_std is not None else [1.0] * z_dim,
        )
        # Orthonormal rows; until fitted, the first z_dim axes of patch space (a valid, poor code).
        self.register_buffer("components", torch.eye(z_dim, dim))  # (z_dim, dim)
        self.register_buffer("patch_mean", torch.zeros(dim))  # (dim,)

    def init_config(self) -> dict:
        """The constructor arguments that rebuild this autoencoder (plain Python values)."""
        keys = ("z_dim", "patch_size", "patch_frames", "in_channels", "latents_mean", "latents_std")
        return {k: list(self.config[k]) if isinstance(self.config[k], (list, tuple)) else self.config[k] for k in keys}

    # ------------------------------------------------------------------ patches

    def _patches(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) with T = 4k + 1 -> (B, T', H', W', dim) patch vectors."""
        b, c, t, h, w = video.shape
        pt, ps = self.config.patch_frames, self.config.patch_size
        if (t - 1) % pt or h % ps or w % ps or c != self.config.in_channels:
            raise ValueError(
                f"video of shape {tuple(video.shape)}: need {self.config.in_channels} channels, "
                f"{pt}k + 1 frames and sides that are multiples of {ps}"
            )
        video = torch.cat([video[:, :, :1].expand(-1, -1, pt - 1, -1, -1), video], dim=2)  # first frame fills a patch
        x = video.reshape(b, c, (t + pt - 1) // pt, pt, h // ps, ps, w // ps, ps)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4)

    def _video(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, T', H', W', dim) -> (B, C, 4(T' - 1) + 1, H, W)."""
        b, t, h, w, _ = patches.shape
        pt, ps, c = self.config.patch_frames, self.config.patch_size, self.config.in_channels
        x = patches.view(b, t, h, w, c, pt, ps, ps).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, c, t * pt, h * ps, w * ps)[:, :, pt - 1 :]

    # ------------------------------------------------------------------ diffusers' autoencoder interface

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Latents (B, z_dim, T', H', W') of video x in [-1, 1], as a deterministic latent distribution."""
        patches = self._patches(x.to(self.components.dtype))
        z = (patches - self.patch_mean) @ self.components.T  # (B, T', H', W', z_dim)
        z = z.permute(0, 4, 1, 2, 3)
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """Video (B, 3, T, H, W) in [-1, 1] of latents z (B, z_dim, T', H', W')."""
        if z.dim() != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"latents of shape {tuple(z.shape)}: need (B, {self.config.z_dim}, T', H', W')")
        patches = z.to(self.components.dtype).permute(0, 2, 3, 4, 1) @ self.components + self.patch_mean
        video = self._video(patches).clamp(-1, 1)
        return DecoderOutput(sample=video) if return_dict else (video,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)

    # ------------------------------------------------------------------ fitting

    @torch.no_grad()
    def fit(self, videos) -> dict:
        """Fit the components and the latent statistics on an iterable of videos (B, 3, T, H, W) in [-1, 1].

        The components are the top ``z_dim`` eigenvectors of the patch covariance (float64). The latent
        statistics are one mean and one std shared by all channels: the channels stay in PCA's
        proportions, so the diffusion loss weighs them as pixel error does (coarse structure first).
        Returns the share of patch variance the components keep.
        """
        dim = self.components.shape[1]
        total, sum_x, sum_xx = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64)
        for video in videos:
            p = self._patches(video.float()).reshape(-1, dim).double()
            total += p.shape[0]
            sum_x += p.sum(0)
            sum_xx += p.T @ p
        if total < 2:
            raise ValueError("fit: no patches; give at least one video")
        mean = sum_x / total
        cov = sum_xx / total - torch.outer(mean, mean)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        top = eigvecs[:, -self.config.z_dim :].flip(1).T  # (z_dim, dim)
        top = top * torch.where(top.sum(1, keepdim=True) < 0, -1.0, 1.0)  # a fixed sign per component
        self.components.copy_(top.to(self.components.dtype))
        self.patch_mean.copy_(mean.to(self.patch_mean.dtype))
        kept = eigvals[-self.config.z_dim :].sum() / eigvals.clamp_min(0).sum()
        latent_var = eigvals[-self.config.z_dim :].mean().item()  # mean variance of a channel (latent mean is 0)
        std = max(latent_var, 1e-12) ** 0.5
        self.register_to_config(latents_mean=[0.0] * self.config.z_dim, latents_std=[std] * self.config.z_dim)
        return dict(variance_kept=kept.item(), latents_std=std, patches=total)
