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
    "Flux2TransformerBlock": {"ab2ac2b92ef3e515"},  # diffusers 0.42.1
    "Flux2SingleTransformerBlock": {"b7a878856f407841"},  # diffusers 0.42.1
    "Flux2Modulation.split": {"56645613983ca4e7"},  # diffusers 0.42.1
    "ChromaTransformerBlock": {"bcbed99a1504dc11"},  # diffusers 0.42.1
    "ChromaAdaLayerNormZeroPruned": {"887fed9b170e098c"},  # diffusers 0.42.1
    "ChromaAdaLayerNormZeroSinglePruned": {"749e53094f2e0766"},  # diffusers 0.42.1
    "ChromaAdaLayerNormContinuousPruned": {"5e0f95cb0da51763"},  # diffusers 0.42.1
    "QwenImageTransformerBlock": {"c80263bdd728d13e"},  # diffusers 0.42.1
    "QwenImageTransformerBlock._modulate": {"04bc16c3904d9fc6"},  # diffusers 0.42.1
    "WanVACETransformerBlock": {"182b5c08d401b25b"},  # diffusers 0.42.1
    "LTX2VideoTransformerBlock": {"ce326dcca641fe3b"},  # diffusers 0.42.1
    "HunyuanVideo15TransformerBlock": {"936519481f15deae"},  # diffusers 0.42.1
    "Lumina2TransformerBlock": {"c2cf5d71bac240c5"},  # diffusers 0.42.1
    "LuminaRMSNormZero": {"0b22d392f255e5a7"},  # diffusers 0.42.1
    "LuminaLayerNormContinuous": {"a521abb336f28748"},  # diffusers 0.42.1
    "CogView4TransformerBlock": {"a9342cb4f90d0701"},  # diffusers 0.42.1
    "CogView4AdaLayerNormZero": {"8431d50b37ab1da5"},  # diffusers 0.42.1
    "CogView4AdaLayerNormContinuous": {"1a5fd9aa0bf117f0"},  # diffusers 0.42.1
    "NucleusMoEImageTransformerBlock": {"f35626df15522ecb"},  # diffusers 0.42.1
    "ZImageTransformerBlock": {"8df391074a7e353f"},  # diffusers 0.42.1
    "ZImage.FinalLayer": {"e2b2d3963050747a"},  # diffusers 0.42.1
    "HunyuanImageTransformerBlock": {"1825d0e21d288c59"},  # diffusers 0.42.1
}
