"""Convenience constructors for the common compositions, and the registry of
codec names used by configuration strings (``"eden:bits=2"``,
``"topk_ef:fraction=0.01"``; see :func:`fedzip.config.build_aggregator`).
"""

from __future__ import annotations

from collections.abc import Callable

from fedzip.codecs.adaptive import AdaptiveBits
from fedzip.codecs.base import Codec, Float32
from fedzip.codecs.ecsq import GaussianECSQ
from fedzip.codecs.eden import DRIVE, EDEN
from fedzip.codecs.entropy import EntropyCoded
from fedzip.codecs.feedback import ErrorFeedback
from fedzip.codecs.kashin import kashin_uniform
from fedzip.codecs.lloydmax import GaussianLloydMax, LloydMax
from fedzip.codecs.lossless import Zstd
from fedzip.codecs.powersgd import PowerSGD
from fedzip.codecs.qsgd import QSGD
from fedzip.codecs.rotation import DEFAULT_BLOCK, RandomRotation
from fedzip.codecs.sign import ScaledSign, SignSGD
from fedzip.codecs.sparsify import RandK, TopK
from fedzip.codecs.summable import SharedScaleQuantization
from fedzip.codecs.uniform import UniformQuantization


def tff_uniform(bits: int = 8) -> UniformQuantization:
    """TFF's compression aggregator: min/max stochastic uniform quantization."""
    return UniformQuantization(bits)


def rotated_uniform(bits: int = 4, block_size: int | None = DEFAULT_BLOCK) -> RandomRotation:
    """Randomized Hadamard rotation, then min/max stochastic uniform quantization
    (Suresh et al., ICML 2017). Unbiased."""
    return RandomRotation(UniformQuantization(bits), block_size)


def rotated_lloyd_max(bits: int = 2, block_size: int | None = DEFAULT_BLOCK) -> RandomRotation:
    """Rotation, then the Gaussian Lloyd-Max levels with the least-squares scale
    (lower MSE than EDEN, biased)."""
    return RandomRotation(GaussianLloydMax(bits, unbiased=False), block_size)


def ecsq(bits: float = 4.0, block_size: int | None = DEFAULT_BLOCK, unbiased: bool = True) -> EntropyCoded:
    """Rotation, uniform quantization at entropy ``bits``, ANS against the
    Gaussian prior: the closest to the rate-distortion bound in this package
    (about 1.42x at 4 and 8 bits). Unbiased by default."""
    return EntropyCoded(RandomRotation(GaussianECSQ(bits, unbiased=unbiased), block_size))


def eden_ans(bits: int = 4, block_size: int | None = DEFAULT_BLOCK) -> EntropyCoded:
    """EDEN with its Lloyd-Max symbols ANS-coded against their Gaussian probabilities."""
    return EntropyCoded(EDEN(bits, block_size))


def qsgd_ans(levels: int = 7, bucket_size: int = 512) -> EntropyCoded:
    """QSGD with ANS instead of the paper's Elias codes."""
    return EntropyCoded(QSGD(levels, bucket_size))


def zstd_uniform(bits: int = 8, level: int = 3) -> Zstd:
    """TFF's min/max quantization followed by generic Zstandard compression."""
    return Zstd(UniformQuantization(bits), level)


def topk_ef(fraction: float = 0.01) -> ErrorFeedback:
    """Top-k with error feedback (Stich et al., NeurIPS 2018)."""
    return ErrorFeedback(TopK(fraction))


def sign_ef() -> ErrorFeedback:
    """EF-signSGD (Karimireddy et al., ICML 2019)."""
    return ErrorFeedback(ScaledSign())


def powersgd_ef(rank: int = 2) -> ErrorFeedback:
    """PowerSGD with error feedback, as in Vogels et al., NeurIPS 2019."""
    return ErrorFeedback(PowerSGD(rank))


def adaptive(target: float = 0.05, family: str = "eden") -> AdaptiveBits:
    """Adaptive bit width keeping the relative error under ``target``;
    ``family`` is ``"eden"`` or ``"uniform"``."""
    families: dict[str, Callable[[int], Codec]] = {"eden": EDEN, "uniform": UniformQuantization}
    if family not in families:
        raise ValueError(f"adaptive family must be one of {sorted(families)}, got {family!r}")
    return AdaptiveBits(families[family], target=target)


def registry() -> dict[str, Callable[..., Codec]]:
    """Codec names (for configuration strings) and their factories."""
    return {
        "float32": Float32,
        "kashin": kashin_uniform,
        "ssq": SharedScaleQuantization,
        "uniform": UniformQuantization,
        "rotated_uniform": rotated_uniform,
        "zstd_uniform": zstd_uniform,
        "qsgd": QSGD,
        "qsgd_ans": qsgd_ans,
        "drive": DRIVE,
        "eden": EDEN,
        "eden_ans": eden_ans,
        "ecsq": ecsq,
        "lloydmax": LloydMax,
        "rotated_lloydmax": rotated_lloyd_max,
        "topk": TopK,
        "topk_ef": topk_ef,
        "randk": RandK,
        "sign": SignSGD,
        "scaled_sign": ScaledSign,
        "sign_ef": sign_ef,
        "powersgd": PowerSGD,
        "powersgd_ef": powersgd_ef,
        "adaptive": adaptive,
    }


_ANS = "Duda, \"Asymmetric numeral systems\", 2013"
_SURESH = "Suresh, Yu, Kumar, McMahan, \"Distributed Mean Estimation with Limited Communication\", ICML 2017"
_EDEN = ("Vargaftik et al., \"EDEN: Communication-Efficient and Robust Distributed Mean Estimation "
         "for Federated Learning\", ICML 2022")
_EF = "Karimireddy, Rebjock, Stich, Jaggi, \"Error Feedback Fixes SignSGD and other Gradient Compression Schemes\", ICML 2019"
_POWERSGD = "Vogels, Karimireddy, Jaggi, \"PowerSGD: Practical Low-Rank Gradient Compression\", NeurIPS 2019"
_STICH = "Stich, Cordonnier, Jaggi, \"Sparsified SGD with Memory\", NeurIPS 2018"

#: registry name → the paper it follows (``fedzip codecs`` prints it)
PAPERS: dict[str, str] = {
    "adaptive": "Faghri et al., \"Adaptive Gradient Quantization for Data-Parallel SGD\", NeurIPS 2020",
    "drive": "Vargaftik et al., \"DRIVE: One-bit Distributed Mean Estimation\", NeurIPS 2021",
    "ecsq": f"Gish, Pierce, \"Asymptotically Efficient Quantizing\", IEEE T-IT 1968; {_SURESH}; {_ANS}",
    "eden": _EDEN,
    "eden_ans": f"{_EDEN}; {_ANS}",
    "float32": "none (IEEE 754 single precision, the uncompressed reference)",
    "kashin": ("Lyubarskii, Vershynin, \"Uncertainty Principles and Vector Quantization\", IEEE T-IT 2010; "
               "Caldas et al., \"Expanding the Reach of Federated Learning\", 2018"),
    "lloydmax": "Lloyd, \"Least Squares Quantization in PCM\", IEEE T-IT 1982; Max, IRE T-IT 1960",
    "powersgd": _POWERSGD,
    "powersgd_ef": _POWERSGD,
    "qsgd": "Alistarh et al., \"QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding\", NeurIPS 2017",
    "qsgd_ans": f"Alistarh et al., NeurIPS 2017; {_ANS}",
    "randk": f"Konečný et al., \"Federated Learning: Strategies for Improving Communication Efficiency\", 2016; {_STICH}",
    "rotated_lloydmax": f"{_SURESH}; {_EDEN}",
    "rotated_uniform": _SURESH,
    "scaled_sign": _EF,
    "sign": "Bernstein, Wang, Azizzadenesheli, Anandkumar, \"signSGD\", ICML 2018",
    "sign_ef": _EF,
    "ssq": ("Kairouz, Liu, Steinke, \"The Distributed Discrete Gaussian Mechanism for Federated Learning "
            "with Secure Aggregation\", ICML 2021 (the shared scale)"),
    "topk": "Aji, Heafield, \"Sparse Communication for Distributed Gradient Descent\", EMNLP 2017",
    "topk_ef": _STICH,
    "uniform": f"{_SURESH}; TFF's compression_aggregator",
    "zstd_uniform": f"{_SURESH}; Collet, Kucherawy, \"Zstandard Compression\", RFC 8878, 2021",
}
