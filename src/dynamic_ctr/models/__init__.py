"""CTR models: backbones with static, APG (adaptive parameter generation) or AdaSparse
dense towers (DNN, WDL, DeepFM, DCN, DCNv2, PNN, xDeepFM, AutoInt+, FiBiNET, FinalMLP;
Deep Crossing without one), xDeepInt/DynInt, and the multi-domain STAR and MMoE.

Needs torch and the standard library only (no Kedro, no pandas).

Shapes (used in every docstring and ``# (...)`` comment of this package):

====  ==============================================================
B     batch size
S     input slots, ``spec.num_slots`` (one per categorical field, ``max_len``
      per sequence field)
F     fields (categorical + sequence); embeddings are ``(B, F, D)``
D     embedding width (``embedding_dim``)
E     flattened embedding width, ``F * D``
H     hidden width of a dense-tower layer; M = d_in, N = d_out of one layer
K     APG rank (``apg.rank``); generated cores ``S_i`` are ``(B, K, K)``
P     inner width of over-parameterised factors (``apg.width``)
J     factors per shared matrix in stacked over-parameterisation (``apg.stack``)
C     width of an APG condition z; G the number of mix-wise condition fields
Q     number of values a generator emits per instance
====  ==============================================================

Input contract: ``model(x)`` with ``x`` an int64 ``(B, S)`` tensor of per-field local
indices, columns in ``spec.index_columns`` order (0 = pad, 1 = OOV), returns ``(B,)``
logits.

Config (``build_model``; keys and defaults, all JSON-able)::

    {
      "family": "wdl",              # dnn | wdl | deepfm | dcn | dcnv2 | pnn | deepcrossing |
                                    #   xdeepfm | autoint | fibinet | finalmlp | xdeepint |
                                    #   star | mmoe | maml
      "embedding_dim": 16,          # D
      "hidden_units": [256, 128, 64],   # the dense tower (finalmlp: stream 1)
      "dropout": 0.0,
      "batch_norm": false,
      "cross_layers": 3,            # dcn / dcnv2
      "dnn": true,                  # false: the interaction layer alone (wdl = LR,
                                    #   deepfm = FM, dcn / dcnv2 = the cross network,
                                    #   pnn = product layer -> linear, xdeepfm = CIN +
                                    #   first order, autoint = AutoInt (not AutoInt+),
                                    #   fibinet = shallow FiBiNET); refused by dnn,
                                    #   deepcrossing and finalmlp
      "domain_field": null,         # star / mmoe / AdaSparse: the domain's field
                                    #   (default spec.domain_field)
      "fm_input": "features",       # deepfm: features (Rendle: FM and first-order
                                    #   term over every active feature, each value of
                                    #   a multi-valued field its own feature, pad slots
                                    #   none) | fields (the mean-pooled fields and the
                                    #   mean first-order weight per field)
      "dynint": null | {...},       # xdeepint: models.config.DynIntConfig
      "adasparse": null | {...},    # AdaSparse pruner in the tower: AdaSparseConfig
      "star": null | {...}, "mmoe": null | {...},   # StarConfig, MMoEConfig
      # one settings block per family below, taken by that family only (defaults
      # filled in when absent; models.config has the dataclasses):
      "pnn": {"product": "inner",   # inner (IPNN) | outer (OPNN, kernel form) | both
              "kernel": "mat"},     # outer's K_ij per pair: mat (D x D) | vec | num
      "deepcrossing": {"residual_units": [256, 128, 64]},  # inner width per unit;
                                    #   no dense tower: apg / adasparse refused
      "xdeepfm": {"cin_layer_sizes": [128, 128],   # H_k feature maps per CIN layer
                  "cin_split_half": true},         #   (all but the last even)
      "autoint": {"attention_layers": 3, "attention_heads": 2,
                  "attention_dim": null,           # A, all heads; default D;
                                                   #   divisible by the heads
                  "attention_residual": true},
      "fibinet": {"senet_reduction": 3,
                  "bilinear_type": "field_interaction"},   # | field_all | field_each
      "finalmlp": {"mlp2_hidden_units": null,      # stream 2 (default hidden_units)
                   "fs_hidden_units": [64],        # each feature-selection gate's MLP
                   "fs1_context": [], "fs2_context": [],   # gate inputs: field names
                                                   #   ([] = a learnable vector)
                   "heads": 1},                    # bilinear fusion heads; divide
                                                   #   both streams' last widths
      "seed": 0,                    # parameter init
      "folded": false,              # set by fold_model
      "apg": null | {               # APG in every hidden layer of the dense tower(s)
        "version": "v4",            # v1 | v2 | v3 | v4 | v5 (see models.apg)
        "rank": 4,                  # K, or one per hidden layer (finalmlp: stream 1's,
                                    #   then stream 2's)
        "width": 32,                # P (v5)
        "stack": 1,                 # J (v5; 1 = the two factors of §3.2.4)
        "generator_layers": 1,
        "generator_hidden": 64,
        "generated_bias": false,
        "reconstruct": false,       # v4: build W_i = V S_i U, then apply it (KDD v2)
        "condition": {
          "mode": "self",           # self | group | mix
          "fields": [],             # group: [user_field]; mix: [user, item] by default
          "aggregation": null,      # mix: input (default) | output
          "combine": null,          # mix: attention (default) | concat | mean
          "attention_dim": 16
        }
      }
    }

Modules: ``embedding`` (FieldEmbedding), ``layers`` (static MLP tower, cross
networks, FM), ``interaction`` (PNN's products, CIN, AutoInt's attention, SENET and
bilinear interaction, FinalMLP's feature selection and fusion, Deep Crossing's residual
unit), ``backbones`` (DNN, WDL, DeepFM, DCN, DCNv2, PNN, DeepCrossing, xDeepFM,
AutoInt, FiBiNET, FinalMLP taking injected dense towers; ``BACKBONES``),
``conditions`` (self/group/mix conditions and combiners),
``apg`` (APGLinear v1-v5, generators, APGTower), ``adasparse`` (AdaSparseTower),
``dynint`` (xDeepInt / DynInt), ``star`` and ``mmoe`` (their networks) with
``multidomain`` (the STAR and MMoE models), ``folding`` and ``inspection``.
"""

from dynamic_ctr.models.backbones import BACKBONES
from dynamic_ctr.models.builder import build_model
from dynamic_ctr.models.config import APGConfig, ConditionConfig, ModelConfig, parse_config
from dynamic_ctr.models.folding import fold_model
from dynamic_ctr.models.inspection import count_parameters, generated_cores, hidden_memory_bytes

__all__ = [
    "BACKBONES",
    "APGConfig",
    "ConditionConfig",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "fold_model",
    "generated_cores",
    "hidden_memory_bytes",
    "parse_config",
]
