"""Check the video README command 1 made, as CI does after running it from a regular install.

    python scripts/check_first_command.py 'vdit-sparse generate "a red square moving right" --out red-square.mp4'

Fails (exit 1, one line) unless the sidecar says the trained weights of the installed package made it and the
prompt-following detector sees the prompt's colour: random weights draw grey noise, which no detector reads as red.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import imageio.v3 as iio

    from vdit_sparse.quality.prompt_following import prompt_following

    import shlex

    command = shlex.split(argv[0])  # the README's command: vdit-sparse generate PROMPT ... --out VIDEO
    prompt, video = command[command.index("generate") + 1], Path(command[command.index("--out") + 1])
    weights = json.loads(video.with_suffix(".json").read_text())["weights"]
    frames = iio.imread(video)  # (T, H, W, 3) uint8
    found = prompt_following(frames, prompt)
    print(f"{video}: {frames.shape[0]} frames, weights {weights}, detected {found['detected_colour']} "
          f"{found['detected_motion']} x{found['detected_count']}")
    if not weights["trained"] or "site-packages" not in weights["source"]:
        print(f"FAIL: the video was not made by the installed package's trained weights ({weights})")
        return 1
    if not found["colour_ok"]:
        print(f"FAIL: the prompt asks {prompt!r} and the detector sees {found['detected_colour']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
