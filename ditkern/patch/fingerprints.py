"""Source fingerprints (``common.source_fingerprint``) of the diffusers forwards that ditkern's fused forwards mirror.

A class whose installed forward has another fingerprint is reported as skipped instead of being patched with a
forward that may no longer compute the same thing. Add a fingerprint here only after the patched-vs-unpatched tests
(tests/patch) pass against that diffusers version.
"""

FINGERPRINTS: dict[str, set[str]] = {
    "AdaLayerNormZero": {"32f92810ecd83614"},  # diffusers 0.42.1
    "AdaLayerNormZeroSingle": {"139766d95de24df8"},  # diffusers 0.42.1
    "SD35AdaLayerNormZeroX": {"0b910f779bdd1e3a"},  # diffusers 0.42.1
    "AdaLayerNormContinuous": {"94e36bd226fde5dc"},  # diffusers 0.42.1
    "BasicTransformerBlock": {"cd4448bf1df441ba"},  # diffusers 0.42.1
    "JointTransformerBlock": {"6076457f308cb93b"},  # diffusers 0.42.1
    "FluxTransformerBlock": {"3c28de28b5f9668e"},  # diffusers 0.42.1
    "WanTransformerBlock": {"94816f8ed0b30583"},  # diffusers 0.42.1
}
