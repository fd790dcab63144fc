"""Codecs: tensors to wire bytes and back. See :mod:`fedzip.codecs.base` for the contract.

Every codec is exported here, flat:

==========================  ======================  ========  ==========================================
codec                       tag                     unbiased  paper
==========================  ======================  ========  ==========================================
``Float32``                 ``f32``                 yes       (no compression)
``UniformQuantization``     ``uq``                  yes*      Suresh et al. 2017; TFF (min/max, 8 bits)
``QSGD``                    ``qsgd``                yes       Alistarh et al., NeurIPS 2017
``RandomRotation(inner)``   ``rot+<inner>``         =inner    Suresh et al. 2017 (randomized Hadamard)
``Kashin(inner)``           ``kashin<r>+<inner>``   =inner    Lyubarskii & Vershynin 2010; Caldas et al. 2018
``DRIVE``                   ``drive``               yes*      Vargaftik et al., NeurIPS 2021
``EDEN``                    ``eden`` / ``eden-rk``  yes       Vargaftik et al., ICML 2022
``GaussianLloydMax``        ``lmg``                 option    Lloyd 1957 / Max 1960 (after rotation)
``LloydMax``                ``lm``                  option    Lloyd-Max levels fitted per tensor
``GaussianECSQ``            ``ecsq``                yes*      Gish & Pierce 1968 (entropy-coded uniform)
``TopK``                    ``topk``                no        Aji & Heafield 2017; Stich et al. 2018
``RandK``                   ``randk+<inner>``       =inner    Konečný et al. 2016
``SignSGD``                 ``sign``                no        Bernstein et al., ICML 2018
``ScaledSign``              ``ssign``               no        Karimireddy et al., ICML 2019
``PowerSGD``                ``psgd``                no        Vogels et al., NeurIPS 2019
``ErrorFeedback(inner)``    ``ef+<inner>``          no        Seide et al. 2014; Karimireddy et al. 2019
``EntropyCoded(inner)``     ``ans+<inner>``         =inner    Duda 2009 (ANS, via constriction)
``Zstd(inner)``             ``zstd+<inner>``        =inner    RFC 8878
``AdaptiveBits``            ``ada``                 =family   AdaQuantFL (Jhunjhunwala et al. 2021)
==========================  ======================  ========  ==========================================

(* with the default options.) Compositions: :mod:`fedzip.codecs.presets`
(``ecsq``, ``eden_ans``, ``topk_ef``, ``powersgd_ef``, ...). Every codec
passes :func:`fedzip.testing.check_compressor`.
"""

from fedzip.codecs.adaptive import AdaptiveBits
from fedzip.codecs.base import Codec, Float32
from fedzip.codecs.ecsq import GaussianECSQ
from fedzip.codecs.eden import DRIVE, EDEN
from fedzip.codecs.entropy import EntropyCoded
from fedzip.codecs.feedback import ErrorFeedback
from fedzip.codecs.kashin import Kashin, kashin_uniform
from fedzip.codecs.lloydmax import GaussianLloydMax, LloydMax
from fedzip.codecs.lossless import Zstd
from fedzip.codecs.policy import CodecPolicy, above_threshold, as_policy
from fedzip.codecs.powersgd import PowerSGD
from fedzip.codecs.presets import (
    adaptive,
    ecsq,
    eden_ans,
    powersgd_ef,
    qsgd_ans,
    registry,
    rotated_lloyd_max,
    rotated_uniform,
    sign_ef,
    tff_uniform,
    topk_ef,
    zstd_uniform,
)
from fedzip.codecs.qsgd import QSGD
from fedzip.codecs.rotation import RandomRotation
from fedzip.codecs.sign import ScaledSign, SignSGD
from fedzip.codecs.sparsify import RandK, TopK
from fedzip.codecs.summable import SharedScaleQuantization, SummableCodec, sum_bits
from fedzip.codecs.symbols import Side, SymbolCodec, Symbols, Transform
from fedzip.codecs.uniform import UniformQuantization

__all__ = [
    "DRIVE",
    "EDEN",
    "QSGD",
    "AdaptiveBits",
    "Codec",
    "CodecPolicy",
    "EntropyCoded",
    "ErrorFeedback",
    "Float32",
    "GaussianECSQ",
    "GaussianLloydMax",
    "Kashin",
    "SharedScaleQuantization",
    "SummableCodec",
    "sum_bits",
    "LloydMax",
    "PowerSGD",
    "RandK",
    "RandomRotation",
    "ScaledSign",
    "Side",
    "SignSGD",
    "SymbolCodec",
    "Symbols",
    "TopK",
    "Transform",
    "UniformQuantization",
    "Zstd",
    "above_threshold",
    "adaptive",
    "as_policy",
    "ecsq",
    "eden_ans",
    "kashin_uniform",
    "powersgd_ef",
    "qsgd_ans",
    "registry",
    "rotated_lloyd_max",
    "rotated_uniform",
    "sign_ef",
    "tff_uniform",
    "topk_ef",
    "zstd_uniform",
]
