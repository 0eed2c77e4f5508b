"""Model size presets of SPEC.md (mirrored by conf/model/*.yaml; a test keeps them equal).

Stoch is always 32 categoricals × ``classes`` and the block GRU has 8 blocks.
"""

from __future__ import annotations

MODEL_SIZES: dict[str, dict[str, int]] = {
    name: dict(
        deter=deter, hidden=hidden, classes=classes, depth=depth, units=units, stoch=32, blocks=8
    )
    for name, deter, hidden, classes, depth, units in [
        ("size1m", 512, 64, 4, 4, 64),
        ("size12m", 2048, 256, 16, 16, 256),
        ("size25m", 3072, 384, 24, 24, 384),
        ("size50m", 4096, 512, 32, 32, 512),
        ("size100m", 6144, 768, 48, 48, 768),
        ("size200m", 8192, 1024, 64, 64, 1024),
        ("size400m", 12288, 1536, 96, 96, 1536),
    ]
}
