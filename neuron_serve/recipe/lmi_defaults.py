"""The values LMI's Neuron engine gives options that a serving.properties leaves out (`recipe from-lmi`).

djl-serving removed its Neuron code in 1132e3ab; it is cited at its parent, afece25d. The Java front end
decides these values before the Python engine runs, so the Java version is the one ported here, quirks
included, so that a converted recipe gets the layout LMI would pick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from neuron_serve.recipe.instances import ALLOWED_TP_DEGREES, Instance
from neuron_serve.recipe.memory import GIB, hbm_per_core

# The defaults below are djl-serving's last Neuron code, removed by 1132e3ab; cited at its parent
# afece25d. Java paths are under wlm/src/main/java/ai/djl/serving/wlm/, Python ones under
# engines/python/setup/djl_python/.
# option.dtype: properties_manager/tnx_properties.py, TransformerNeuronXProperties.dtype = Dtype.f16
# (fp16 since 46842517, "making default dtype to fp16 for compilation").
LMI_DTYPE = "fp16"
# option.n_positions: min(max_position_embeddings, 4096), LmiUtils.java
# HuggingFaceModelConfig.getDefaultNPositions; with no max_position_embeddings known, 4096:
# neuron_utils/neuron_smart_default_utils.py apply_smart_defaults, min(config.get(..., 4096), 4096).
N_POSITIONS_CAP = 4096
# option.max_rolling_batch_size: NeuronSmartDefaultUtils.java MAX_ROLLING_BATCH caps the heuristic;
# LmiConfigRecommender.java setRollingBatchSize sets 32 when no heuristic ran.
MAX_ROLLING_BATCH = 32


def config_int(config: dict[str, Any], key: str) -> int:
    # LMI reads config.json with Gson into int fields, so an absent one is 0.
    return int(config.get(key) or 0)


def lmi_parameter_count(config: dict[str, Any]) -> int:
    """LMI's parameter count (LmiUtils.java HuggingFaceModelConfig.getModelParameters), as it is: for
    llama and mistral its "head_dim" is heads x KV heads, which gives Llama 3 8B's q/k/v width by
    chance (32 x 8 x 8 x 3 = 4096 + 2 x 1024) but not 70B's; other models count as GPT-2."""
    hidden, vocab, layers = (config_int(config, k) for k in ("hidden_size", "vocab_size", "num_hidden_layers"))
    if config.get("model_type") in ("llama", "mistral"):
        kv_heads = config_int(config, "num_key_value_heads")
        qkv = config_int(config, "num_attention_heads") * kv_heads * hidden * kv_heads * 3
        layer = qkv + hidden * hidden + hidden * config_int(config, "intermediate_size") * 3 + 2 * hidden
        return 2 * vocab * hidden + layers * layer + hidden
    embeddings = (vocab + config_int(config, "max_position_embeddings")) * hidden
    return embeddings + layers * (12 * hidden * hidden + 4 * hidden) + hidden * vocab


@dataclass(frozen=True)
class NeuronSmartDefaults:
    """LMI's memory heuristic for tensor_parallel_degree and max_rolling_batch_size on Neuron
    (NeuronSmartDefaultUtils.java), units and rounding as they are, so that a converted recipe gets the
    layout LMI would pick: the model in GB of 1e9 bytes, a sequence and a core's HBM in GiB."""

    cores: int
    memory_per_core: float
    model_gb: float
    sequence_gb: float
    tp_degrees: tuple[int, ...]

    @classmethod
    def of(
        cls, config: dict[str, Any], n_positions: int, quantized: bool, inst: Instance
    ) -> NeuronSmartDefaults | None:
        """None when the config does not size the model (neuron_smart_default_utils.py gives up then)."""
        weight_bytes = 1 if quantized else 2  # whatever the dtype: setInternalSettings' paramBytes
        model_gb = weight_bytes * lmi_parameter_count(config) / 1e9
        # getApproxMemoryForSingleSequence (one hidden vector per token and layer), less 5%.
        token = config_int(config, "hidden_size") * config_int(config, "num_hidden_layers") * weight_bytes
        sequence_gb = n_positions * token * 0.95 / GIB
        if model_gb <= 0 or sequence_gb <= 0:
            return None
        return cls(inst.neuron_cores, hbm_per_core(inst) / GIB, model_gb, sequence_gb, ALLOWED_TP_DEGREES[inst.family])

    def batch_size(self, tp: int) -> int:
        """getMaxConcurrency: the largest power of two of sequences, at most 32, that fit beside the
        weights (2% more per extra rank) on `tp` cores; 0 when none does."""
        weights = self.model_gb * (1 + (tp * 2 - 2) / 100)
        fits = min(int((tp * self.memory_per_core - weights) / self.sequence_gb), MAX_ROLLING_BATCH)
        return 1 << (fits.bit_length() - 1) if fits > 0 else 0

    def _instance_concurrency(self, tp: int, batch: int | None) -> int:
        # getMaxConcurrencyWithBatch: with a fixed batch a replica serves all of it or counts for none.
        per_replica = self.batch_size(tp)
        if batch is not None:
            per_replica = batch if per_replica >= batch else 0
        return per_replica * (self.cores // tp)

    def tp_degree(self, batch: int | None) -> int:
        """setHeuristicNeuronTPDegree: the fewest cores per replica that serve, over the instance, as
        many sequences as one replica on every core. Candidates are buildCoreConfigs' 1, 2, 4, 8 and all
        cores, those that hold 1.1 x the model, and (unlike LMI, which would try all 12 cores of
        inf2.24xlarge) only neuron-serve's TP degrees."""
        least = math.ceil(1.1 * self.model_gb / self.memory_per_core)
        candidates = [1, 2, 4, 8] + ([self.cores] if self.cores > 8 else [])
        tp, best = self.cores, self._instance_concurrency(self.cores, batch)
        for cores in (c for c in candidates if c >= least and c in self.tp_degrees):
            here = self._instance_concurrency(cores, batch)
            if here >= best and cores <= tp:
                tp, best = cores, here
        return tp
