"""The token grid of one video self-attention call: frames × height × width, plus text."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT_POSITIONS = ("none", "before", "after")


@dataclass(frozen=True)
class VideoLayout:
    """Where each token of a (B, H, N, D) attention input sits.

    Video tokens are frame-major: token ``f * height * width + y * width + x`` in the video part.
    ``text_tokens`` extra tokens sit ``"before"`` or ``"after"`` the video part (joint attention
    of HunyuanVideo / CogVideoX), or there are none (Wan keeps text in cross-attention).
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_position: str = "none"

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VideoLayout {name}={value!r}: must be a positive integer")
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(
                f"VideoLayout text_position={self.text_position!r}: must be one of {', '.join(TEXT_POSITIONS)}"
            )
        if self.text_tokens < 0 or (self.text_tokens > 0) != (self.text_position != "none"):
            raise ValueError(
                f"VideoLayout text_tokens={self.text_tokens} with text_position={self.text_position!r}: "
                "give a positive count with 'before'/'after', or 0 with 'none'"
            )

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def video_start(self) -> int:
        return self.text_tokens if self.text_position == "before" else 0

    @property
    def text_start(self) -> int:
        return 0 if self.text_position == "before" else self.video_tokens

    def check(self, n: int, what: str = "sequence length") -> None:
        if n != self.num_tokens:
            raise ValueError(
                f"{what} {n} does not match the layout: {self.frames} frames × {self.height} × {self.width}"
                f" + {self.text_tokens} text tokens = {self.num_tokens}"
            )

    def frame_of_video_token(self, device=None) -> torch.Tensor:
        """(video_tokens,) frame index of each video token."""
        return torch.arange(self.frames, device=device).repeat_interleave(self.frame_tokens)

    def spatial_major_order(self, device=None) -> torch.Tensor:
        """(video_tokens,) int64 gather order that makes the video part spatial-major.

        Position ``p * frames + f`` of the result holds frame-major token ``f * frame_tokens + p``,
        so the tokens of one spatial position across all frames become contiguous.
        """
        idx = torch.arange(self.video_tokens, device=device).view(self.frames, self.frame_tokens)
        return idx.t().reshape(-1)
