"""Typed, frozen model configs and their strict parsing from plain dicts.

``build_model`` accepts a JSON-able dict; :func:`parse_config` turns it into a
:class:`ModelConfig` (unknown keys and bad values raise ``ValueError`` naming the
dotted key, e.g. ``apg.condition.combine``) and :func:`resolve_config` fills the
defaults that depend on the feature spec (the condition fields) and checks the
ranks against the layer widths. ``ModelConfig.to_dict()`` is the normalized dict a
checkpoint stores.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from dynamic_ctr.spec import FeatureSpec

__all__ = [
    "ADASPARSE_FORMULATIONS",
    "APG_VERSIONS",
    "BILINEAR_TYPES",
    "COMBINES",
    "FAMILIES",
    "FM_INPUTS",
    "PNN_KERNELS",
    "PNN_PRODUCTS",
    "APGConfig",
    "AdaSparseConfig",
    "AutoIntConfig",
    "ConditionConfig",
    "DeepCrossingConfig",
    "DynIntConfig",
    "FiBiNETConfig",
    "FinalMLPConfig",
    "MAMLConfig",
    "MMoEConfig",
    "ModelConfig",
    "PNNConfig",
    "StarConfig",
    "XDeepFMConfig",
    "dense_towers",
    "layer_widths",
    "parse_config",
    "resolve_config",
    "tower_config",
]

FAMILIES = (
    "dnn", "wdl", "deepfm", "dcn", "dcnv2", "pnn", "deepcrossing", "xdeepfm", "autoint", "fibinet",
    "finalmlp", "xdeepint", "star", "mmoe", "maml",
)
#: Families with a dense (MLP, APG or AdaSparse) tower (finalmlp: two); xdeepint is its
#: interaction network alone, deepcrossing its residual units (no plain MLP); star and
#: mmoe are multi-domain networks of their own.
DENSE_FAMILIES = ("dnn", "wdl", "deepfm", "dcn", "dcnv2", "pnn", "xdeepfm", "autoint", "fibinet", "finalmlp", "maml")
#: Families that are nothing without their MLP, so ``dnn: false`` is refused.
DNN_ONLY_FAMILIES = ("dnn", "deepcrossing", "finalmlp")
#: Families that read a domain id per sample (``domain_field``).
DOMAIN_FAMILIES = ("star", "mmoe", "maml")
ADASPARSE_FORMULATIONS = ("binarization", "scaling", "fusion")
PRUNER_INPUTS = ("domain_and_hidden", "domain")
MAML_FAST_WEIGHTS = ("head", "tower")
DYNINT_MODES = ("static", "da", "dgp", "dwp")
APG_VERSIONS = ("v1", "v2", "v3", "v4", "v5")
CONDITION_MODES = ("self", "group", "mix")
AGGREGATIONS = ("input", "output")
COMBINES = ("concat", "mean", "attention")
FM_INPUTS = ("features", "fields")
PNN_PRODUCTS = ("inner", "outer", "both")
PNN_KERNELS = ("mat", "vec", "num")
BILINEAR_TYPES = ("field_all", "field_each", "field_interaction")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")


# Values of the wrong type are bad config values too: ValueError naming the key
# (the build_model contract), hence the TRY004 exemptions below.
def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a bool")  # noqa: TRY004


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {choices}")


def _check_float(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False) -> None:
    """A finite number in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        bound = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be a finite number in {bound}")


def _check_units(name: str, value: Any, allow_empty: bool = False) -> None:
    if not isinstance(value, tuple) or not (value or allow_empty):
        raise ValueError(f"{name}={value!r} must be a {'' if allow_empty else 'non-empty '}list of widths")
    for h in value:
        _check_int(name, h, 1)


def _check_fields(name: str, value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(f, str) for f in value):
        raise ValueError(f"{name}={value!r} must be a list of field names")
    if len(set(value)) != len(value):
        raise ValueError(f"{name}={list(value)} has duplicates")


@dataclass(frozen=True)
class ConditionConfig:
    """Where the APG condition ``z`` comes from (KDD §3.1).

    Args:
        mode: ``"self"`` (z = the layer's own input), ``"group"`` (z = one field's
            embedding) or ``"mix"`` (z from several field embeddings).
        fields: field names of the condition embeddings (group: exactly one, default
            ``spec.user_field``; mix: at least two, default user and item fields).
            Must be empty for ``self``.
        aggregation: mix only: ``"input"`` (aggregate the embeddings, one generator)
            or ``"output"`` (one generator per embedding, aggregate the generated
            parameters). Default ``"input"``.
        combine: mix only: ``"concat"``, ``"mean"`` or ``"attention"``. Default
            ``"attention"`` (the setting of KDD §4.3).
        attention_dim: width of the query/key projections of ``combine="attention"``.
    """

    mode: str = "self"
    fields: tuple[str, ...] = ()
    aggregation: str | None = None
    combine: str | None = None
    attention_dim: int = 16

    def __post_init__(self) -> None:
        p = "apg.condition."
        _check_choice(p + "mode", self.mode, CONDITION_MODES)
        if not isinstance(self.fields, tuple) or not all(isinstance(f, str) for f in self.fields):
            raise ValueError(f"{p}fields={self.fields!r} must be a list of field names")
        if len(set(self.fields)) != len(self.fields):
            raise ValueError(f"{p}fields={list(self.fields)} has duplicates")
        _check_int(p + "attention_dim", self.attention_dim, 1)
        if self.mode == "self" and self.fields:
            raise ValueError(f"{p}fields must be empty for mode='self', got {list(self.fields)}")
        if self.mode == "group" and len(self.fields) > 1:
            raise ValueError(
                f"{p}fields={list(self.fields)}: mode='group' takes one field; use mode='mix'"
            )
        if self.mode == "mix" and len(self.fields) == 1:
            raise ValueError(f"{p}fields={list(self.fields)}: mode='mix' needs at least two fields")
        for key, choices in (("aggregation", AGGREGATIONS), ("combine", COMBINES)):
            value = getattr(self, key)
            if value is None:
                continue
            if self.mode != "mix":
                raise ValueError(
                    f"{p}{key}={value!r} only applies to mode='mix', not {self.mode!r}"
                )
            _check_choice(p + key, value, choices)

    @property
    def output_aggregation(self) -> bool:
        return self.mode == "mix" and self.aggregation == "output"


@dataclass(frozen=True)
class APGConfig:
    """Adaptive Parameter Generation for every hidden layer of the dense tower.

    Args:
        version: ``v1`` generated full W_i; ``v2`` generated U_i, S_i, V_i
            reconstructed to W_i; ``v3`` the same, decomposed feed-forward; ``v4``
            shared U, V and generated S_i (K x K); ``v5`` v4 with over-parameterised
            U = U^l U^r, V = V^l V^r. See ``models/apg.py``.
        rank: K, one int for all layers or one per hidden layer (ignored by v1).
        width: P, inner width of the v5 factors (KDD §4.5.2 uses P = 32).
        stack: J of Appendix F: v5 factors per shared matrix; 1 (off) means the two
            factors of §3.2.4, J >= 2 means U = U^1 ... U^J. v5 only.
        generator_layers: layers of the generator MLP G (1 = one linear map, the
            paper's default).
        generator_hidden: hidden width of G when ``generator_layers > 1``.
        generated_bias: the generator also emits the layer bias (else a shared bias).
        reconstruct: v4 only: build ``W_i = V S_i U (B, M, N)`` per instance, then
            apply it, instead of the decomposed ``U(S_i(V x))``. The same function and
            parameters as v4, computed in v2's order: the KDD version's Table-5 "v2"
            (``benchmarks/apg_table5.py``); slower, never needed for training.
        condition: see :class:`ConditionConfig`.
    """

    version: str = "v4"
    rank: int | tuple[int, ...] = 4
    width: int = 32
    stack: int = 1
    generator_layers: int = 1
    generator_hidden: int = 64
    generated_bias: bool = False
    reconstruct: bool = False
    condition: ConditionConfig = field(default_factory=ConditionConfig)

    def __post_init__(self) -> None:
        _check_choice("apg.version", self.version, APG_VERSIONS)
        ranks = self.rank if isinstance(self.rank, tuple) else (self.rank,)
        if not ranks:
            raise ValueError("apg.rank=[] must be an int or a non-empty list of ints")
        for k in ranks:
            _check_int("apg.rank", k, 1)
        _check_int("apg.width", self.width, 1)
        _check_int("apg.stack", self.stack, 1)
        if self.stack > 1 and self.version != "v5":
            raise ValueError(f"apg.stack={self.stack} needs version 'v5', not {self.version!r}")
        _check_int("apg.generator_layers", self.generator_layers, 1)
        _check_int("apg.generator_hidden", self.generator_hidden, 1)
        _check_bool("apg.generated_bias", self.generated_bias)
        _check_bool("apg.reconstruct", self.reconstruct)
        if self.reconstruct and self.version != "v4":
            raise ValueError(f"apg.reconstruct=True needs version 'v4', not {self.version!r}")
        if not isinstance(self.condition, ConditionConfig):
            message = f"apg.condition={self.condition!r} must be a ConditionConfig"
            raise ValueError(message)  # noqa: TRY004

    def rank_of(self, layer: int) -> int:
        """K of hidden layer ``layer`` (0-based)."""
        return self.rank[layer] if isinstance(self.rank, tuple) else self.rank

    @property
    def num_factors(self) -> int:
        """Factors per shared matrix: 1 (v4), 2 (v5) or J (v5 stacked)."""
        return 1 if self.version != "v5" else max(2, self.stack)


@dataclass(frozen=True)
class DynIntConfig:
    """The polynomial interaction network of ``xdeepint`` (DynInt §3; ``models/dynint.py``).

    Args:
        mode: ``static`` (xDeepInt), ``da`` (dynamic activation), ``dgp`` (generated
            parameters, W = U Sigma_i V^T) or ``dwp`` (weighted parameters, G_i o W).
        layers: PIN layers L (the paper's depth, 1-4).
        subspaces: h, sub-spaces of the embedding (must divide ``embedding_dim``).
        rank: K of dgp/dwp; capped at F * h, what the fields allow (§4.1.4).
        reduction: r, the generators' reduction ratio.
        orthogonal_rate: weight of the orthogonal regulariser (eqs. 11-12), added to
            the loss through the model's ``penalty()`` (dgp and dwp; 0 = off).
    """

    mode: str = "static"
    layers: int = 3
    subspaces: int = 1
    rank: int = 4
    reduction: int = 4
    orthogonal_rate: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("dynint.mode", self.mode, DYNINT_MODES)
        for name in ("layers", "subspaces", "rank", "reduction"):
            _check_int(f"dynint.{name}", getattr(self, name), 1)
        rate = self.orthogonal_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate < math.inf:
            raise ValueError(f"dynint.orthogonal_rate={rate!r} must be a finite float >= 0")


@dataclass(frozen=True)
class AdaSparseConfig:
    """AdaSparse (Yang et al., CIKM 2022): a domain-adaptive pruner in every hidden layer
    of the dense tower (``models/adasparse.py``). Defaults are §4.1.2's.

    Args:
        formulation: ``binarization`` (0/1 factors, eqs. 4-5), ``scaling`` (``beta
            sigma(v)``, eqs. 6-7) or ``fusion`` (eq. 8).
        pruner_input: ``domain_and_hidden`` (eq. 3, ``[e_d; h^l]``) or ``domain``
            (``e_d`` only: the factors depend on the domain alone, which makes the
            per-domain pruned serving form exact).
        fields: the domain-aware fields whose embeddings form ``e_d``; default the
            model's ``domain_field``.
        beta, epsilon: the scale and the threshold of the factors.
        alpha_start, alpha_max, anneal_steps: the sigmoid slope alpha, annealed over
            training steps (never in evaluation).
        r_min, r_max: the sparsity-ratio boundary of the regulariser (eqs. 9-10).
        lambda_start, lambda_growth, lambda_max: the regulariser's lambda-hat, growing
            linearly per training step up to ``lambda_max``.
        stop_gradient: the pruner reads ``sg([e_d; h^l])``.
    """

    formulation: str = "binarization"
    pruner_input: str = "domain_and_hidden"
    fields: tuple[str, ...] = ()
    beta: float = 2.0
    epsilon: float = 0.25
    alpha_start: float = 0.1
    alpha_max: float = 5.0
    anneal_steps: int = 1000
    r_min: float = 0.15
    r_max: float = 0.25
    lambda_start: float = 0.01
    lambda_growth: float = 1e-4
    lambda_max: float = 1.0
    stop_gradient: bool = True

    def __post_init__(self) -> None:
        p = "adasparse."
        _check_choice(p + "formulation", self.formulation, ADASPARSE_FORMULATIONS)
        _check_choice(p + "pruner_input", self.pruner_input, PRUNER_INPUTS)
        if not isinstance(self.fields, tuple) or not all(isinstance(f, str) for f in self.fields):
            raise ValueError(f"{p}fields={self.fields!r} must be a list of field names")
        _check_float(p + "beta", self.beta, 1.0)
        _check_float(p + "epsilon", self.epsilon, 0.0, low_open=True)
        _check_float(p + "alpha_start", self.alpha_start, 0.0, low_open=True)
        _check_float(p + "alpha_max", self.alpha_max, self.alpha_start)
        _check_int(p + "anneal_steps", self.anneal_steps, 1)
        _check_float(p + "r_min", self.r_min, 0.0, 1.0)
        _check_float(p + "r_max", self.r_max, self.r_min, 1.0)
        for name in ("lambda_start", "lambda_growth", "lambda_max"):
            _check_float(p + name, getattr(self, name), 0.0)
        _check_bool(p + "stop_gradient", self.stop_gradient)


@dataclass(frozen=True)
class StarConfig:
    """STAR (Sheng et al., CIKM 2021; ``models/star.py``): the star-topology network on
    ``hidden_units`` with partitioned normalisation and an auxiliary network of widths
    ``aux_hidden`` on the domain embedding."""

    aux_hidden: tuple[int, ...] = (64,)
    norm: bool = True

    def __post_init__(self) -> None:
        _check_units("star.aux_hidden", self.aux_hidden)
        _check_bool("star.norm", self.norm)


@dataclass(frozen=True)
class MMoEConfig:
    """MMoE (Ma et al., KDD 2018; ``models/mmoe.py``) with one gate and one tower per
    domain: ``num_experts`` shared experts of widths ``expert_units``, towers of
    ``tower_units``. ``lazy_domains``: the gates and towers are read with row-sparse
    gradients and updated lazily, the batch's domains only (what the fine grain, a gate and
    a tower per item, needs); False gives them dense gradients and Adam, which data-parallel
    training and CUDA graphs need."""

    num_experts: int = 4
    expert_units: tuple[int, ...] = (128, 64)
    tower_units: tuple[int, ...] = (32,)
    lazy_domains: bool = True

    def __post_init__(self) -> None:
        _check_int("mmoe.num_experts", self.num_experts, 1)
        _check_units("mmoe.expert_units", self.expert_units)
        _check_units("mmoe.tower_units", self.tower_units)
        _check_bool("mmoe.lazy_domains", self.lazy_domains)


@dataclass(frozen=True)
class MAMLConfig:
    """First-order MAML over domains (``models/multidomain.py``).

    Attributes:
        inner_lr: the inner SGD step's size.
        fast_weights: what each domain adapts: ``head`` (the prediction head, ANIL) or
            ``tower`` (every linear map of the dense tower and the head; the embeddings
            stay shared).
    """

    inner_lr: float = 0.5
    fast_weights: str = "head"

    def __post_init__(self) -> None:
        _check_float("maml.inner_lr", self.inner_lr, 0.0, low_open=True)
        _check_choice("maml.fast_weights", self.fast_weights, MAML_FAST_WEIGHTS)


@dataclass(frozen=True)
class PNNConfig:
    """PNN's product layer (Qu et al., ICDM 2016; ``models/interaction.py``).

    Args:
        product: ``inner`` (IPNN: ``<e_i, e_j>`` per field pair), ``outer`` (OPNN in the
            kernel form of Qu et al. 2018, ``e_i^T K_ij e_j``) or ``both`` (PNN*).
        kernel: the outer product's kernel per pair: ``mat`` (a D x D matrix), ``vec``
            (a diagonal, D weights) or ``num`` (one weight times the inner product).
            Ignored by ``product: inner``.
    """

    product: str = "inner"
    kernel: str = "mat"

    def __post_init__(self) -> None:
        _check_choice("pnn.product", self.product, PNN_PRODUCTS)
        _check_choice("pnn.kernel", self.kernel, PNN_KERNELS)

    @property
    def products(self) -> int:
        """Product values per field pair: 1 (inner or outer) or 2 (both)."""
        return 2 if self.product == "both" else 1


@dataclass(frozen=True)
class DeepCrossingConfig:
    """Deep Crossing (Shan et al., KDD 2016): ``residual_units`` holds the inner width of
    each residual unit (one unit per entry; every unit maps ``E -> E``)."""

    residual_units: tuple[int, ...] = (256, 128, 64)

    def __post_init__(self) -> None:
        _check_units("deepcrossing.residual_units", self.residual_units)


@dataclass(frozen=True)
class XDeepFMConfig:
    """xDeepFM's Compressed Interaction Network (Lian et al., KDD 2018).

    Args:
        cin_layer_sizes: H_k, the feature maps of each CIN layer.
        cin_split_half: half of each layer's maps (all but the last layer's) feed the
            next layer, the other half the output (the paper's code and DeepCTR); every
            size but the last must then be even.
    """

    cin_layer_sizes: tuple[int, ...] = (128, 128)
    cin_split_half: bool = True

    def __post_init__(self) -> None:
        _check_units("xdeepfm.cin_layer_sizes", self.cin_layer_sizes)
        _check_bool("xdeepfm.cin_split_half", self.cin_split_half)
        if self.cin_split_half and any(h % 2 for h in self.cin_layer_sizes[:-1]):
            raise ValueError(
                f"xdeepfm.cin_layer_sizes={list(self.cin_layer_sizes)}: with cin_split_half every size "
                "but the last must be even"
            )


@dataclass(frozen=True)
class AutoIntConfig:
    """AutoInt's interacting layers (Song et al., CIKM 2019).

    Args:
        attention_layers: stacked multi-head self-attention layers over the fields.
        attention_heads: heads per layer; must divide ``attention_dim``.
        attention_dim: the width of each field's output of a layer, all heads together
            (``heads x d'`` in the paper); default (None) ``embedding_dim``.
        attention_residual: add ``W_res e_m`` before the ReLU (eq. 7).
    """

    attention_layers: int = 3
    attention_heads: int = 2
    attention_dim: int | None = None
    attention_residual: bool = True

    def __post_init__(self) -> None:
        _check_int("autoint.attention_layers", self.attention_layers, 1)
        _check_int("autoint.attention_heads", self.attention_heads, 1)
        if self.attention_dim is not None:
            _check_int("autoint.attention_dim", self.attention_dim, 1)
        _check_bool("autoint.attention_residual", self.attention_residual)


@dataclass(frozen=True)
class FiBiNETConfig:
    """FiBiNET (Huang et al., RecSys 2019): SENET and the bilinear interaction.

    Args:
        senet_reduction: r, the SENET excitation's reduction ratio (``F // r`` units).
        bilinear_type: ``field_all`` (one W), ``field_each`` (one W per field) or
            ``field_interaction`` (one W per field pair).
    """

    senet_reduction: int = 3
    bilinear_type: str = "field_interaction"

    def __post_init__(self) -> None:
        _check_int("fibinet.senet_reduction", self.senet_reduction, 1)
        _check_choice("fibinet.bilinear_type", self.bilinear_type, BILINEAR_TYPES)


@dataclass(frozen=True)
class FinalMLPConfig:
    """FinalMLP (Mao et al., AAAI 2023): two MLP streams, feature selection, fusion.

    Stream 1 is the dense tower of ``hidden_units``; stream 2 a second one of
    ``mlp2_hidden_units``. Both are built like any dense tower (APG or AdaSparse apply
    to both; a per-layer ``apg.rank`` lists stream 1's layers, then stream 2's).

    Args:
        mlp2_hidden_units: stream 2's widths; default (None) ``hidden_units``.
        fs_hidden_units: hidden widths of each feature-selection gate's MLP (may be empty:
            one linear map).
        fs1_context, fs2_context: the fields whose embeddings each gate reads; empty: a
            learnable vector (the gate is then the same for every instance).
        heads: heads of the bilinear fusion; must divide both streams' last widths.
    """

    mlp2_hidden_units: tuple[int, ...] | None = None
    fs_hidden_units: tuple[int, ...] = (64,)
    fs1_context: tuple[str, ...] = ()
    fs2_context: tuple[str, ...] = ()
    heads: int = 1

    def __post_init__(self) -> None:
        if self.mlp2_hidden_units is not None:
            _check_units("finalmlp.mlp2_hidden_units", self.mlp2_hidden_units)
        _check_units("finalmlp.fs_hidden_units", self.fs_hidden_units, allow_empty=True)
        _check_fields("finalmlp.fs1_context", self.fs1_context)
        _check_fields("finalmlp.fs2_context", self.fs2_context)
        _check_int("finalmlp.heads", self.heads, 1)


#: The family settings blocks: only the family of the same name takes its block, and
#: ``resolve_config`` fills in the defaults when it is absent.
FAMILY_CONFIGS: dict[str, type] = {
    "star": StarConfig,
    "mmoe": MMoEConfig,
    "maml": MAMLConfig,
    "pnn": PNNConfig,
    "deepcrossing": DeepCrossingConfig,
    "xdeepfm": XDeepFMConfig,
    "autoint": AutoIntConfig,
    "fibinet": FiBiNETConfig,
    "finalmlp": FinalMLPConfig,
}


@dataclass(frozen=True)
class ModelConfig:
    """One CTR model: a backbone family, its dense tower, and optionally APG.

    Args:
        family: backbone, one of ``FAMILIES``.
        embedding_dim: D, the width of every field embedding.
        hidden_units: widths of the hidden layers of the dense tower (H_1, H_2, ...);
            FinalMLP's stream 1. Ignored by ``deepcrossing`` (``deepcrossing.residual_units``).
        dropout: dropout after each hidden layer (0 = none); also after each residual
            unit of ``deepcrossing``.
        batch_norm: BatchNorm1d after each hidden linear map (before the ReLU).
        cross_layers: cross layers of ``dcn``/``dcnv2`` (ignored by other families).
        dnn: keep the dense tower (default). ``False`` leaves a model's interaction
            layer alone, as in DynInt Table 2: ``wdl`` becomes logistic regression (its
            first-order term), ``deepfm`` an FM with its first-order term, ``dcn`` /
            ``dcnv2`` the cross network and its linear head, ``pnn`` the product layer
            (with the flattened embeddings) into a linear head, ``xdeepfm`` CIN plus the
            first-order term, ``autoint`` AutoInt without the "+", ``fibinet`` the
            shallow FiBiNET (combination layer into a linear head, plus first order).
            ``dnn``, ``deepcrossing`` and ``finalmlp`` have nothing else and refuse it;
            ``xdeepint`` never has a DNN and ignores the key.
        fm_input: what ``deepfm``'s FM and first-order terms run over (ignored by other
            families). ``"features"`` (default, Rendle 2010): every active feature,
            each value of a multi-valued field its own feature with x = 1 (pad slots
            contribute nothing), so the FM has the pairs within a field too and the
            first-order term sums the weights of all values. ``"fields"``: the
            mean-pooled field embeddings and the mean first-order weight per field
            (the DNN part's input; the behaviour before this key existed). The two
            agree when every field is single-valued.
        apg: None for a static dense tower, else every hidden linear map is an APG layer.
        adasparse: None, or AdaSparse's pruner in every hidden layer of the dense tower
            (see :class:`AdaSparseConfig`); not together with ``apg``.
        domain_field: the field whose value is a sample's domain for ``star``, ``mmoe``
            and AdaSparse's default ``e_d`` (categorical; default ``spec.domain_field``).
            A coarse partition (a genre) or a fine one (the item, APG Table 6).
        star, mmoe, maml, pnn, deepcrossing, xdeepfm, autoint, fibinet, finalmlp: the
            settings of the family of that name (its defaults when absent; any other
            family refuses the block). See :class:`PNNConfig` and the classes after it.
        dynint: the interaction network of family ``xdeepint`` (required there, refused
            elsewhere); ``hidden_units``, ``dropout`` and ``batch_norm`` do not apply to it.
        seed: seed of the parameter init (``build_model`` does not touch the global RNG).
        folded: set by ``fold_model``: deployment form (v5 factors multiplied out,
            dropout removed); ``build_model`` returns such a model in eval mode.
    """

    family: str = "wdl"
    embedding_dim: int = 16
    hidden_units: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.0
    batch_norm: bool = False
    cross_layers: int = 3
    dnn: bool = True
    fm_input: str = "features"
    apg: APGConfig | None = None
    adasparse: AdaSparseConfig | None = None
    domain_field: str | None = None
    star: StarConfig | None = None
    mmoe: MMoEConfig | None = None
    maml: MAMLConfig | None = None
    pnn: PNNConfig | None = None
    deepcrossing: DeepCrossingConfig | None = None
    xdeepfm: XDeepFMConfig | None = None
    autoint: AutoIntConfig | None = None
    fibinet: FiBiNETConfig | None = None
    finalmlp: FinalMLPConfig | None = None
    dynint: DynIntConfig | None = None
    seed: int = 0
    folded: bool = False

    def __post_init__(self) -> None:
        _check_choice("family", self.family, FAMILIES)
        _check_int("embedding_dim", self.embedding_dim, 1)
        if not isinstance(self.hidden_units, tuple) or not self.hidden_units:
            raise ValueError(f"hidden_units={self.hidden_units!r} must be a non-empty list")
        for h in self.hidden_units:
            _check_int("hidden_units", h, 1)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not 0.0 <= self.dropout < 1.0
            or math.isnan(self.dropout)
        ):
            raise ValueError(f"dropout={self.dropout!r} must be a float in [0, 1)")
        _check_bool("batch_norm", self.batch_norm)
        _check_int("cross_layers", self.cross_layers, 1)
        _check_bool("dnn", self.dnn)
        if not self.dnn and self.family in DNN_ONLY_FAMILIES:
            alone = {"dnn": "its dense tower", "deepcrossing": "its residual units", "finalmlp": "its two MLP streams"}
            raise ValueError(f"dnn=False: family {self.family!r} is {alone[self.family]} alone; nothing would be left")
        if not self.dnn and (self.apg is not None or self.adasparse is not None):
            raise ValueError("dnn=False with apg or adasparse: there is no dense tower to make adaptive")
        if self.apg is not None and self.adasparse is not None:
            raise ValueError("adasparse: a tower is either APG or AdaSparse, not both")
        if self.adasparse is not None:
            if not isinstance(self.adasparse, AdaSparseConfig):
                raise ValueError(f"adasparse={self.adasparse!r} must be an AdaSparseConfig or None")
            if self.family not in DENSE_FAMILIES:
                raise ValueError(f"adasparse: family {self.family!r} has no dense tower to prune")
        if self.apg is not None and self.family == "deepcrossing":
            raise ValueError("apg: family 'deepcrossing' has no plain MLP (only residual units) to make adaptive")
        if self.domain_field is not None and not isinstance(self.domain_field, str):
            raise ValueError(f"domain_field={self.domain_field!r} must be a field name")
        for key, kind in FAMILY_CONFIGS.items():
            value = getattr(self, key)
            if value is not None and (self.family != key or not isinstance(value, kind)):
                raise ValueError(f"{key}={value!r}: only family {key!r} takes it, as a {kind.__name__}")
        self._check_family_settings()
        _check_choice("fm_input", self.fm_input, FM_INPUTS)
        _check_int("seed", self.seed, 0)
        _check_bool("folded", self.folded)
        if self.folded and (
            self.dropout > 0 or (self.apg is not None and self.apg.version == "v5")
        ):
            raise ValueError(
                "folded=True needs dropout=0 and no v5 layers (fold_model multiplies them out)"
            )
        if (self.family == "xdeepint") != (self.dynint is not None):
            raise ValueError(f"dynint={self.dynint!r}: family 'xdeepint' needs a dynint config, and only it takes one")
        if self.dynint is not None:
            if not isinstance(self.dynint, DynIntConfig):
                raise ValueError(f"dynint={self.dynint!r} must be a DynIntConfig or None")
            if self.embedding_dim % self.dynint.subspaces:
                raise ValueError(
                    f"dynint.subspaces={self.dynint.subspaces} must divide embedding_dim={self.embedding_dim}"
                )
            if self.apg is not None:
                raise ValueError("apg: family 'xdeepint' has no dense tower to make adaptive")
        if self.apg is not None:
            if not isinstance(self.apg, APGConfig):
                raise ValueError(f"apg={self.apg!r} must be an APGConfig or None")
            layers = sum(len(units) for units in self.tower_units())
            if isinstance(self.apg.rank, tuple) and len(self.apg.rank) != layers:
                where = "hidden_units, then finalmlp.mlp2_hidden_units" if self.family == "finalmlp" else "hidden_units"
                raise ValueError(
                    f"apg.rank={list(self.apg.rank)} needs one rank per hidden layer ({layers} in {where})"
                )

    def _check_family_settings(self) -> None:
        """The checks of a family block that need the rest of the config."""
        tower_adapted = self.maml is not None and self.maml.fast_weights == "tower"
        if tower_adapted and (self.apg is not None or self.adasparse is not None):
            raise ValueError(
                "maml.fast_weights='tower' adapts a plain tower of linear maps per domain; with "
                f"{'apg' if self.apg is not None else 'adasparse'} the tower is not one: use "
                "maml.fast_weights: head"
            )
        if tower_adapted and self.batch_norm:
            raise ValueError(
                "maml.fast_weights='tower' adapts each linear map of the tower per domain, and one "
                "shared BatchNorm between them would normalise every domain's adapted maps with "
                "the batch's mixed statistics: set batch_norm: false, or maml.fast_weights: head"
            )
        if self.autoint is not None:
            dim = self.autoint.attention_dim or self.embedding_dim
            if dim % self.autoint.attention_heads:
                raise ValueError(
                    f"autoint.attention_dim={dim} must be divisible by "
                    f"autoint.attention_heads={self.autoint.attention_heads}"
                )
        if self.finalmlp is not None:
            heads = self.finalmlp.heads
            last = [units[-1] for units in self.tower_units()]
            if any(width % heads for width in last):
                raise ValueError(
                    f"finalmlp.heads={heads} must divide the last width of both streams, {last}"
                )

    def tower_units(self) -> tuple[tuple[int, ...], ...]:
        """The hidden widths of each dense tower: none for families without one (or with
        ``dnn: false``), two for ``finalmlp`` (stream 1, stream 2), else one."""
        if self.family not in DENSE_FAMILIES or not self.dnn:
            return ()
        if self.family == "finalmlp":
            second = self.finalmlp.mlp2_hidden_units if self.finalmlp is not None else None
            return (self.hidden_units, second or self.hidden_units)
        return (self.hidden_units,)

    def to_dict(self) -> dict[str, Any]:
        """The normalized, JSON-able form (tuples become lists)."""
        return _jsonable(asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _tuplify(value: Any) -> Any:
    """Lists (JSON arrays) become tuples; anything else passes through (and fails
    the dataclass check if it is not what the field expects)."""
    return tuple(value) if isinstance(value, list | tuple) else value


def _from_dict(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}={d!r} must be a dict")  # noqa: TRY004
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys: {sorted(allowed)}"
        )
    kwargs = {}
    for key, value in d.items():
        if key == "apg":
            value = None if value is None else _from_dict(APGConfig, value, "apg.")
        elif key == "dynint":
            value = None if value is None else _from_dict(DynIntConfig, value, "dynint.")
        elif key in SUB_CONFIGS and not prefix:
            value = None if value is None else _from_dict(SUB_CONFIGS[key], value, key + ".")
        elif key == "condition":
            value = _from_dict(ConditionConfig, value, prefix + "condition.")
        elif key in _LIST_KEYS:
            value = _tuplify(value)
        kwargs[key] = value
    return cls(**kwargs)


SUB_CONFIGS: dict[str, type] = {"adasparse": AdaSparseConfig, **FAMILY_CONFIGS}
#: Keys whose JSON lists become tuples.
_LIST_KEYS = frozenset({
    "hidden_units", "fields", "rank", "aux_hidden", "expert_units", "tower_units", "residual_units",
    "cin_layer_sizes", "mlp2_hidden_units", "fs_hidden_units", "fs1_context", "fs2_context",
})


def parse_config(config: dict[str, Any] | ModelConfig) -> ModelConfig:
    """A validated :class:`ModelConfig` from a plain dict (or an existing one)."""
    if isinstance(config, ModelConfig):
        return config
    return _from_dict(ModelConfig, config, "")


def dense_towers(cfg: ModelConfig, spec: FeatureSpec) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """``(E_in, hidden_units)`` of each dense tower of ``cfg`` (see
    :meth:`ModelConfig.tower_units`), with the input width its family feeds it:

    * ``pnn``: the product layer, ``E + P`` (inner or outer) or ``E + 2P`` (both), P =
      F (F - 1) / 2 field pairs;
    * ``fibinet``: the combination layer, the bilinear outputs of the SENET and of the
      original embeddings, ``2 P D``;
    * every other family: the flattened embeddings, ``E = F D``.
    """
    num_fields = len(spec.fields)
    pairs = num_fields * (num_fields - 1) // 2
    in_dim = num_fields * cfg.embedding_dim
    if cfg.family == "pnn":
        in_dim += pairs * (cfg.pnn or PNNConfig()).products
    elif cfg.family == "fibinet":
        in_dim = 2 * pairs * cfg.embedding_dim
    return tuple((in_dim, units) for units in cfg.tower_units())


def layer_widths(cfg: ModelConfig, spec: FeatureSpec) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of every hidden layer of every dense tower, in tower order (the
    order of a per-layer ``apg.rank``)."""
    return [pair for in_dim, units in dense_towers(cfg, spec) for pair in itertools.pairwise([in_dim, *units])]


def tower_config(cfg: ModelConfig, tower: int) -> ModelConfig:
    """The config that builds dense tower ``tower`` of ``cfg`` on its own.

    ``cfg`` itself for a family with one tower. For ``finalmlp``: a ``dnn`` config with
    that stream's ``hidden_units`` and its slice of a per-layer ``apg.rank``; every
    setting of the tower (dropout, batch norm, APG, AdaSparse) is ``cfg``'s.
    """
    units = cfg.tower_units()
    if len(units) == 1 and tower == 0:
        return cfg
    if not 0 <= tower < len(units):
        raise ValueError(f"{tower=}: family {cfg.family!r} has {len(units)} dense tower(s)")
    apg = cfg.apg
    if apg is not None and isinstance(apg.rank, tuple):
        first = sum(len(u) for u in units[:tower])
        apg = replace(apg, rank=apg.rank[first : first + len(units[tower])])
    blocks = dict.fromkeys(FAMILY_CONFIGS)
    return replace(cfg, family="dnn", hidden_units=units[tower], apg=apg, **blocks)


def _resolve_domains(cfg: ModelConfig, spec: FeatureSpec) -> ModelConfig:
    """Fill ``domain_field`` (star, mmoe, AdaSparse) and AdaSparse's ``fields`` from the
    spec, check that they exist, and give star / mmoe their default settings."""
    needs_domain = cfg.family in DOMAIN_FAMILIES or cfg.adasparse is not None
    if not needs_domain:
        return cfg
    known = {f.name: f for f in spec.fields}
    domain = cfg.domain_field or spec.domain_field
    if cfg.family in DOMAIN_FAMILIES or (cfg.adasparse is not None and not cfg.adasparse.fields):
        if domain is None:
            raise ValueError("domain_field: the spec has no domain field; name one (e.g. '@domain' or a column)")
        if domain not in known or known[domain].kind != "categorical":
            raise ValueError(f"domain_field={domain!r} must be a categorical field of the spec {sorted(known)}")
    updates: dict[str, Any] = {"domain_field": domain}
    if cfg.adasparse is not None:
        fields_ = cfg.adasparse.fields or (domain,)
        unknown = [f for f in fields_ if f not in known]
        if unknown:
            raise ValueError(f"adasparse.fields: no field(s) {unknown} in the spec {sorted(known)}")
        updates["adasparse"] = replace(cfg.adasparse, fields=tuple(fields_))
    return replace(cfg, **updates)


def _resolve_family(cfg: ModelConfig, spec: FeatureSpec) -> ModelConfig:
    """Give the family its settings block (defaults when absent) with the spec-dependent
    values filled in (AutoInt's ``attention_dim``, FinalMLP's stream-2 widths), and check
    the field names and counts it needs."""
    kind = FAMILY_CONFIGS.get(cfg.family)
    if kind is None:
        return cfg
    block = getattr(cfg, cfg.family) or kind()
    known = [f.name for f in spec.fields]
    if cfg.family == "autoint" and block.attention_dim is None:
        block = replace(block, attention_dim=cfg.embedding_dim)
    elif cfg.family == "finalmlp":
        for key in ("fs1_context", "fs2_context"):
            missing = [name for name in getattr(block, key) if name not in known]
            if missing:
                raise ValueError(f"finalmlp.{key}: no field(s) {missing} in the spec {known}")
        if block.mlp2_hidden_units is None:
            block = replace(block, mlp2_hidden_units=cfg.hidden_units)
    elif cfg.family == "fibinet" and len(known) < 2:
        raise ValueError(f"family 'fibinet' needs at least two fields to pair; the spec has {known}")
    return replace(cfg, **{cfg.family: block})


def resolve_config(config: dict[str, Any] | ModelConfig, spec: FeatureSpec) -> ModelConfig:
    """Parse ``config`` and fill the spec-dependent defaults.

    Fills the condition fields (group: ``spec.user_field``; mix: user and item
    fields) and the mix defaults (``aggregation="input"``, ``combine="attention"``),
    and checks every field name and every rank ``K <= min(d_in, d_out)``.
    """
    cfg = _resolve_family(_resolve_domains(parse_config(config), spec), spec)
    if cfg.apg is None:
        return cfg
    apg = cfg.apg
    cond = apg.condition
    if cond.mode != "self":
        names = cond.fields
        if not names:
            defaults = (
                (spec.user_field,) if cond.mode == "group" else (spec.user_field, spec.item_field)
            )
            names = tuple(n for n in defaults if n is not None)
            if len(names) < (1 if cond.mode == "group" else 2):
                raise ValueError(
                    f"apg.condition.fields: the spec has user_field={spec.user_field!r}, "
                    f"item_field={spec.item_field!r}; give the fields explicitly"
                )
        known = [f.name for f in spec.fields]
        for name in names:
            if name not in known:
                raise ValueError(f"apg.condition.fields: no field {name!r} in the spec {known}")
        if cond.mode == "mix":
            cond = replace(
                cond,
                fields=names,
                aggregation=cond.aggregation or "input",
                combine=cond.combine or "attention",
            )
        else:
            cond = replace(cond, fields=names)
    if apg.version != "v1":
        for i, (d_in, d_out) in enumerate(layer_widths(cfg, spec)):
            k = apg.rank_of(i)
            if k > min(d_in, d_out):
                raise ValueError(
                    f"apg.rank={k} exceeds min(d_in, d_out)={min(d_in, d_out)} of hidden layer {i} "
                    f"({d_in} -> {d_out})"
                )
    return replace(cfg, apg=replace(apg, condition=cond))
