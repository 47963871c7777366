"""``apply_transformer_kernels(model)``: this package's fused ops inside a built or loaded transformers model.

Modules keep their parameters, buffers and ``state_dict`` keys: each patched module's class is
swapped for a subclass of it whose ``forward`` calls the fused ops (so ``isinstance`` still holds,
saving and loading are unchanged, and patching twice finds nothing left to do). What is fused:

- post-LN blocks (BART, Marian, BERT): ``LayerNorm(residual + dropout(sublayer))`` as one
  ``dropout_add_layer_norm``;
- pre-LN blocks (mBART, Whisper, Llama/Qwen2): the residual add that precedes a sublayer's norm and
  the norm as one ``dropout_add_layer_norm(prenorm=True)``; each layer's first norm, whose residual
  comes from the previous layer, as a norm alone;
- feed-forward blocks: ReLU / GELU / GELU-tanh MLPs as ``ffn`` (``fused_linear`` for BERT's split
  one); gated SwiGLU / GeGLU MLPs as two projections, ``glu``, and the down projection;
- every other ``LayerNorm`` / RMSNorm as ``dropout_add_layer_norm``;
- the LM head and its loss, in training with ``labels``, as ``linear_cross_entropy`` (no ``[N, V]``
  logits: the output's ``logits`` is then None);
- attention, by switching the model to ``attn_implementation="transformer_kernels"``.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import nn as tknn
from ..ops import dropout_add_layer_norm, ffn, fused_linear, glu, linear_cross_entropy

# The architectures whose modules this file knows, by config.model_type.
POST_LN_SEQ2SEQ = ("bart", "marian")
PRE_LN_SEQ2SEQ = ("mbart", "whisper")
GATED_DECODERS = ("llama", "qwen2")
ENCODERS = ("bert",)
SUPPORTED = POST_LN_SEQ2SEQ + PRE_LN_SEQ2SEQ + GATED_DECODERS + ENCODERS


@dataclasses.dataclass
class PatchReport:
    """What :func:`apply_transformer_kernels` fused (module paths, by kind) and what it left (and why)."""

    fused: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    left: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, kind: str, path: str) -> None:
        self.fused.setdefault(kind, []).append(path)

    def __str__(self) -> str:
        lines = [f"fused {kind}: {len(paths)}" for kind, paths in self.fused.items()]
        lines += [f"left {what}: {why}" for what, why in self.left.items()]
        return "\n".join(lines)


def activation_name(act) -> str | None:
    """The fused ops' name of a transformers / torch activation module, or None if they have none."""
    name = type(act).__name__
    if name == "ReLU":
        return "relu"
    if name == "GELUActivation" or (name == "GELU" and getattr(act, "approximate", "none") == "none"):
        return "gelu"
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh") or (
        name == "GELU" and getattr(act, "approximate", None) == "tanh"
    ):
        return "gelu_tanh"
    if name in ("SiLU", "SiLUActivation"):
        return "silu"
    return None


def _norm(x: Tensor, residual: Tensor | None, norm, dropout_p: float, training: bool, prenorm: bool = False):
    """``norm(residual + dropout(x))`` for a LayerNorm or an RMSNorm module (read: weight, bias, eps)."""
    rms = not isinstance(norm, torch.nn.LayerNorm)
    eps = norm.variance_epsilon if rms else norm.eps
    return dropout_add_layer_norm(
        x,
        residual,
        norm.weight,
        None if rms else norm.bias,
        dropout_p,
        eps,
        prenorm=prenorm,
        rms_norm=rms,
        training=training,
    )


# ---------------------------------------------------------------------------------------------
# Forwards of the patched classes. Each mirrors the transformers forward it replaces, call for call
# on the attention modules, and differs only in the fused steps.


class FusedRMSNorm:
    """Llama-style RMSNorm (``weight``, ``variance_epsilon``) as ``dropout_add_layer_norm(rms_norm=True)``."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return _norm(hidden_states, None, self, 0.0, False)


class _FFNMixin:
    """fc1 → activation → activation dropout → fc2 as ``ffn``, where the activation is a fused one."""

    def _ffn(self, x: Tensor) -> Tensor:
        act = activation_name(self.activation_fn)
        if act in ("relu", "gelu", "gelu_tanh"):
            return ffn(
                x,
                self.fc1.weight,
                self.fc1.bias,
                self.fc2.weight,
                self.fc2.bias,
                act,
                self.activation_dropout,
                training=self.training,
            )
        h = F.dropout(self.activation_fn(self.fc1(x)), p=self.activation_dropout, training=self.training)
        return self.fc2(h)


def _clamp_fp16(h: Tensor) -> Tensor:
    # Whisper's encoder layers keep fp16 activations finite this way; BART's clamp only once a value
    # overflowed, which differs from this only for magnitudes above 64504 (65504 - 1000).
    if h.dtype == torch.float16:
        big = torch.finfo(h.dtype).max - 1000
        h = torch.clamp(h, min=-big, max=big)
    return h


class FusedPostLNEncoderLayer(_FFNMixin):
    """BART / Marian encoder layer: LayerNorm(residual + dropout(sublayer)) fused."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        a, _ = self.self_attn(hidden_states, attention_mask=attention_mask, **kwargs)
        h = _norm(a, hidden_states, self.self_attn_layer_norm, self.dropout, self.training)
        h = _norm(self._ffn(h), h, self.final_layer_norm, self.dropout, self.training)
        return _clamp_fp16(h)


class FusedPostLNDecoderLayer(_FFNMixin):
    """BART / Marian decoder layer: LayerNorm(residual + dropout(sublayer)) fused, three times."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        cache=None,
        use_cache: bool | None = True,
        **kwargs,
    ) -> Tensor:
        a, _ = self.self_attn(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        h = _norm(a, hidden_states, self.self_attn_layer_norm, self.dropout, self.training)
        if encoder_hidden_states is not None:
            a, _ = self.encoder_attn(
                h, key_value_states=encoder_hidden_states, attention_mask=encoder_attention_mask, cache=cache, **kwargs
            )
            h = _norm(a, h, self.encoder_attn_layer_norm, self.dropout, self.training)
        return _norm(self._ffn(h), h, self.final_layer_norm, self.dropout, self.training)


class FusedPreLNEncoderLayer(_FFNMixin):
    """mBART / Whisper encoder layer: the residual add before the FFN's norm fused with it."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        a, _ = self.self_attn(
            _norm(hidden_states, None, self.self_attn_layer_norm, 0.0, False), attention_mask=attention_mask, **kwargs
        )
        normed, s = _norm(a, hidden_states, self.final_layer_norm, self.dropout, self.training, prenorm=True)
        h = s + F.dropout(self._ffn(normed), p=self.dropout, training=self.training)
        return _clamp_fp16(h)


class FusedPreLNDecoderLayer(_FFNMixin):
    """mBART / Whisper decoder layer: each residual add before a norm fused with that norm."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        cache=None,
        use_cache: bool | None = True,
        **kwargs,
    ) -> Tensor:
        normed = _norm(hidden_states, None, self.self_attn_layer_norm, 0.0, False)
        a, _ = self.self_attn(normed, cache=cache, attention_mask=attention_mask, **kwargs)
        s = hidden_states
        if encoder_hidden_states is not None:
            normed, s = _norm(a, s, self.encoder_attn_layer_norm, self.dropout, self.training, prenorm=True)
            a, _ = self.encoder_attn(
                normed,
                key_value_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                cache=cache,
                **kwargs,
            )
        normed, s = _norm(a, s, self.final_layer_norm, self.dropout, self.training, prenorm=True)
        return s + F.dropout(self._ffn(normed), p=self.dropout, training=self.training)


class FusedGatedDecoderLayer:
    """Llama / Qwen2 / Mistral decoder layer: the residual add after attention fused with the MLP's RMSNorm."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        **kwargs,
    ) -> Tensor:
        a, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        normed, s = _norm(a, hidden_states, self.post_attention_layernorm, 0.0, False, prenorm=True)
        return s + self.mlp(normed)


class FusedGatedMLP:
    """down(act(gate(x)) * up(x)): the projections as they are (cuBLAS), the gated activation as ``glu``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), activation_name(self.act_fn)))


class FusedBertSelfOutput:
    """BERT's attention output: LayerNorm(input + dropout(dense(h))), the norm fused with the add."""

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return _norm(self.dense(hidden_states), input_tensor, self.LayerNorm, self.dropout.p, self.training)


class FusedBertIntermediate:
    """BERT's FFN up projection and activation as one ``fused_linear``."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        act = activation_name(self.intermediate_act_fn)
        return fused_linear(hidden_states, self.dense.weight, self.dense.bias, act)


# ---------------------------------------------------------------------------------------------
# The LM head and its loss in training: the decoder's last hidden states go to linear_cross_entropy.


def _arguments(fn, args, kwargs) -> dict:
    """The arguments of a call of the bound method ``fn``, by name (its ``**kwargs`` flattened in)."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop("kwargs", {}))
    return arguments


def _base_arguments(base, arguments: dict) -> dict:
    params = inspect.signature(base.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    skip = {"labels", "logits_to_keep", "num_items_in_batch", "shift_labels", "return_dict"}
    return {k: v for k, v in arguments.items() if k not in skip and (k in params or takes_kwargs)}


def _loss(hidden: Tensor, head: torch.nn.Linear, labels: Tensor, bias: Tensor | None, num_items=None) -> Tensor:
    d = hidden.shape[-1]
    reduction = "mean" if num_items is None else "sum"
    loss = linear_cross_entropy(
        hidden.reshape(-1, d), head.weight, labels.reshape(-1).to(hidden.device), bias, reduction=reduction
    )
    return loss if num_items is None else loss / num_items


def _decoder_inputs(model, labels: Tensor) -> Tensor:
    """The decoder inputs transformers derives from the labels: shifted right after the start token."""
    if hasattr(model, "prepare_decoder_input_ids_from_labels"):
        return model.prepare_decoder_input_ids_from_labels(labels=labels)
    shifted = labels.new_full(labels.shape, model.config.pad_token_id)
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, model.config.pad_token_id)
    shifted[:, 0] = model.config.decoder_start_token_id
    return shifted


class FusedSeq2SeqLM:
    """``*ForConditionalGeneration`` whose training loss with labels never forms the logits."""

    def forward(self, *args, **kwargs):
        original = super().forward  # the transformers class's forward
        arguments = _arguments(original, args, kwargs)
        labels = arguments.get("labels")
        if labels is None or not (self.training and torch.is_grad_enabled()):
            return original(*args, **kwargs)
        from transformers.modeling_outputs import Seq2SeqLMOutput

        if arguments.get("decoder_input_ids") is None and arguments.get("decoder_inputs_embeds") is None:
            arguments["decoder_input_ids"] = _decoder_inputs(self, labels)
        arguments["use_cache"] = False
        out = self.model(**_base_arguments(self.model, arguments))
        bias = getattr(self, "final_logits_bias", None)
        loss = _loss(out.last_hidden_state, self.get_output_embeddings(), labels, None if bias is None else bias[0])
        return Seq2SeqLMOutput(
            loss=loss,
            logits=None,
            decoder_hidden_states=out.decoder_hidden_states,
            decoder_attentions=out.decoder_attentions,
            cross_attentions=out.cross_attentions,
            encoder_last_hidden_state=out.encoder_last_hidden_state,
            encoder_hidden_states=out.encoder_hidden_states,
            encoder_attentions=out.encoder_attentions,
        )


class FusedCausalLM:
    """``*ForCausalLM`` whose training loss with labels never forms the logits (labels shifted as transformers does)."""

    def forward(self, *args, **kwargs):
        original = super().forward
        arguments = _arguments(original, args, kwargs)
        labels = arguments.get("labels")
        if labels is None or not (self.training and torch.is_grad_enabled()):
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = self.model(**_base_arguments(self.model, arguments))
        shifted = arguments.get("shift_labels")
        if shifted is None:
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
        head = self.get_output_embeddings()
        loss = _loss(out.last_hidden_state, head, shifted, head.bias, arguments.get("num_items_in_batch"))
        return CausalLMOutputWithPast(
            loss=loss, logits=None, hidden_states=out.hidden_states, attentions=out.attentions
        )


# ---------------------------------------------------------------------------------------------
# The class swap.

_SUBCLASSES: dict[tuple[type, type], type] = {}


def _swap(module: torch.nn.Module, mixin: type) -> bool:
    """Give ``module`` the class ``mixin + its class``; False if it already has it."""
    cls = type(module)
    if getattr(cls, "_transformer_kernels_mixin", None) is not None:
        return False
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(
            cls.__name__, (mixin, cls), {"_transformer_kernels_mixin": mixin, "__module__": cls.__module__}
        )
    module.__class__ = _SUBCLASSES[key]
    return True


def _layer_mixins(model_type: str) -> dict[str, type]:
    """Class-name suffix → patch, for the layers of one architecture family."""
    if model_type in POST_LN_SEQ2SEQ:
        return {"EncoderLayer": FusedPostLNEncoderLayer, "DecoderLayer": FusedPostLNDecoderLayer}
    if model_type in PRE_LN_SEQ2SEQ:
        return {"EncoderLayer": FusedPreLNEncoderLayer, "DecoderLayer": FusedPreLNDecoderLayer}
    if model_type in GATED_DECODERS:
        return {"DecoderLayer": FusedGatedDecoderLayer, "MLP": FusedGatedMLP, "RMSNorm": FusedRMSNorm}
    if model_type in ENCODERS:
        return {
            "SelfOutput": FusedBertSelfOutput,
            "BertOutput": FusedBertSelfOutput,
            "Intermediate": FusedBertIntermediate,
        }
    return {}


def _left_inside(module: torch.nn.Module, mixin: type) -> str | None:
    """What part of ``module`` stays unfused under ``mixin`` (it runs transformers' own code), and why."""
    if issubclass(mixin, _FFNMixin) and activation_name(module.activation_fn) not in ("relu", "gelu", "gelu_tanh"):
        return f"FFN: activation {type(module.activation_fn).__name__} has no fused kernel (ReLU, GELU, GELU-tanh do)"
    return None


def _why_not(module: torch.nn.Module, mixin: type) -> str | None:
    """Why ``module`` cannot take ``mixin``'s forward at all, or None."""
    if mixin is FusedGatedMLP and activation_name(module.act_fn) not in ("silu", "gelu", "gelu_tanh"):
        return f"gated activation {type(module.act_fn).__name__} has no fused kernel (SiLU, GELU, GELU-tanh do)"
    if mixin is FusedBertIntermediate and activation_name(module.intermediate_act_fn) not in (
        "relu",
        "gelu",
        "gelu_tanh",
    ):
        return f"activation {type(module.intermediate_act_fn).__name__} has no fused kernel (ReLU, GELU, GELU-tanh do)"
    return None


def apply_transformer_kernels(
    model: torch.nn.Module, *, attention: bool = True, layers: bool = True, loss: bool = True
) -> PatchReport:
    """Patch a transformers model in place to run this package's fused ops; returns what was fused.

    Args:
        model: a transformers ``PreTrainedModel`` of a supported architecture (``SUPPORTED``).
        attention: switch the model to ``attn_implementation="transformer_kernels"``.
        layers: fuse the norms, residual adds and MLPs (see the module docstring).
        loss: in training with ``labels``, the LM head + cross-entropy as ``linear_cross_entropy``.

    Weights, buffers and ``state_dict`` keys are unchanged; a second call finds nothing to do.
    Raises ValueError for a model type this function does not know (its attention may still run
    through ``attn_implementation="transformer_kernels"``).
    """
    from . import NAME, register

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"apply_transformer_kernels: model type {model_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED)}): its layers' structure is unknown here, so nothing is fused. Its attention "
            f"alone can run fused with attn_implementation='{NAME}', masks permitting."
        )
    report = PatchReport()
    if attention:
        register()
        if config._attn_implementation != NAME:
            model.set_attn_implementation(NAME)
            report.add("attention", type(model).__name__)
    if layers:
        mixins = _layer_mixins(model_type)
        for path, module in model.named_modules():
            name = type(module).__name__
            mixin = next((m for suffix, m in mixins.items() if name.endswith(suffix)), None)
            if mixin is not None:
                reason = _why_not(module, mixin)
                if reason is not None:
                    report.left[f"{path} ({name})"] = reason
                elif _swap(module, mixin):
                    report.add(mixin.__name__, path)
                    partly = _left_inside(module, mixin)
                    if partly is not None:
                        report.left[f"{path} ({name})"] = partly
            elif type(module) is torch.nn.LayerNorm:  # the norms outside the fused layers
                module.__class__ = tknn.LayerNorm
                report.add("LayerNorm", path)
    if loss:
        name = type(model).__name__
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        mixin = None
        if head is not None and model_type in POST_LN_SEQ2SEQ + PRE_LN_SEQ2SEQ and hasattr(model, "model"):
            mixin = FusedSeq2SeqLM
        elif head is not None and model_type in GATED_DECODERS and name.endswith("ForCausalLM"):
            mixin = FusedCausalLM
        if mixin is None:
            report.left[f"loss ({name})"] = "no language-model head with a cross-entropy loss to fuse"
        elif _swap(model, mixin):
            report.add("linear_cross_entropy", name)
    for what, why in report.left.items():
        warnings.warn(f"apply_transformer_kernels: not fused: {what}: {why}", stacklevel=2)
    return report
