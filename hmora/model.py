"""HMoRAModel: a transformers causal LM with HMoRA layers injected, its task encoder, losses and generation."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

import hmora_kernels
from hmora_kernels import RankWise

from .config import HMoRAConfig
from .context import LOSS_TASK, ROUTING_TASK, ForwardContext, RoutingState
from .injection import inject
from .layers import AdapterLinear, ExpertLinear, LoRALinear
from .reentrant import TaskGradBridge, tap
from .routers import Router
from .task_encoder import TaskEncoder

IGNORE_INDEX = -100
B_MATRIX_SUFFIX = "lora_B"


@dataclass
class HMoRAOutput(ModelOutput):
    """loss = lambda_lm * ce_loss + lambda_auxiliary * (aux_loss + task_aux_loss) (None without labels); under a
    routing variant loss = lambda_lm * ce_loss + aux_loss (its task routers have no loss).

    aux_loss: unweighted sum of the token-router losses (GJS or load balancing), each shared router once. Under a
    routing variant: the mean over token routers of the variant's losses, each weighted by its own coefficient
    (balance_loss_coef, router_z_loss_coef, entropy_loss_coef); aux_loss_terms: name ("balance", "z", "entropy")
    -> that loss unweighted, mean over the token routers, for logs.
    task_aux_loss: unweighted sum of the task-router losses (GJS over a batch of task weights), over this batch's
    sequences or the sources given as `task_loss_input_ids`; None without task routers or with
    `with_task_loss=False`.
    router_probs / router_gates: owner module name -> p_tok / final gates (B, S, E), token-routed layers;
    router_gates also for task-only layers. task_probs: owner module name -> (B, E) for task routers.
    The base model's other outputs (its cache, hidden states, attentions) follow under its own names.
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    ce_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    aux_loss_terms: Optional[Dict[str, torch.Tensor]] = None
    task_aux_loss: Optional[torch.Tensor] = None
    task_repr: Optional[torch.Tensor] = None
    router_probs: Optional[Dict[str, torch.Tensor]] = None
    router_gates: Optional[Dict[str, torch.Tensor]] = None
    task_probs: Optional[Dict[str, torch.Tensor]] = None

    @classmethod
    def extending(cls, base_output, **fields) -> "HMoRAOutput":
        """Our fields, plus every other entry of the base model's output (its cache, hidden states, ...) under the
        name the installed transformers gives it. Those entries are set as items, never passed to __init__, so a
        library that renames its own fields (5.24: `past_key_values` -> `cache`) cannot break the constructor."""
        output = cls(**fields)
        for key, value in base_output.items():
            if key not in fields:
                output[key] = value
        return output


def prompt_part(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: Optional[torch.Tensor]):
    """(ids, mask) of the prompt tokens (attended and labels == -100) of each row, left-padded."""
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if labels is not None:
        keep = keep & (labels == IGNORE_INDEX)
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)  # dropped first, kept last, order kept
    length = max(int(keep.sum(1).max()), 1)
    ids = input_ids.gather(1, order)[:, -length:]
    mask = keep.gather(1, order)[:, -length:]
    return ids.masked_fill(~mask, 0), mask.long()


class HMoRAModel(nn.Module):
    """A causal LM with HMoRA adapters. Build it with `get_hmora_model` or `HMoRAModel.from_pretrained`.

    Parameter naming rule: every B matrix (expert banks and plain LoRA) is a parameter whose name ends in
    `lora_B` (`is_b_matrix(name)`); A matrices end in `lora_A`; routers live under `.router.`, the task
    encoder under `task_encoder.`.
    """

    accepts_loss_kwargs = False  # our loss is a mean over this batch's targets; let Trainer scale it

    def __init__(self, base_model: nn.Module, config: HMoRAConfig, tokenizer=None):
        super().__init__()
        config = copy.deepcopy(config)
        base_model.requires_grad_(False)
        self.base_model = base_model
        self._routing = RoutingState()
        embeddings = base_model.get_input_embeddings()
        d = embeddings.weight.shape[1]
        self._groups = inject(base_model, config, self._routing, task_dim=d)
        self.hmora_config = config
        self.task_encoder = None
        if config.use_task_router and any(g.router.kind != "token" for g in self._groups):
            self.task_encoder = TaskEncoder(d, config.num_encoder_heads, config.num_encoder_layer, config.dropout,
                                            self._task_token_init(embeddings, tokenizer),
                                            config.position_frequencies, device=embeddings.weight.device)
            self.task_encoder.requires_grad_(config.trainable_encoder)

    def _task_token_init(self, embeddings: nn.Embedding, tokenizer) -> torch.Tensor:
        config = self.hmora_config
        if config.task_token_id is None and tokenizer is not None:
            config.task_token_id = tokenizer.convert_tokens_to_ids(config.task_token)
        table = embeddings.weight.detach()
        if config.task_token_id is None:
            return table.float().mean(0)
        if not 0 <= config.task_token_id < table.shape[0]:
            raise ValueError(f"HMoRAConfig.task_token_id {config.task_token_id} is outside the vocabulary "
                             f"(size {table.shape[0]})")
        return table[config.task_token_id].float()

    # ---- transformers-facing attributes -----------------------------------------------------------------
    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self.base_model.get_input_embeddings().weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base_model.get_output_embeddings()

    @property
    def generation_config(self):
        return self.base_model.generation_config

    def can_generate(self) -> bool:
        return self.base_model.can_generate()

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.base_model.prepare_inputs_for_generation(*args, **kwargs)

    def add_model_tags(self, tags) -> None:
        """Model-card tags (TRL adds its own); kept by the wrapped transformers model."""
        self.base_model.add_model_tags(tags)

    def enable_input_require_grads(self) -> None:
        self.base_model.enable_input_require_grads()

    def get_base_model(self) -> nn.Module:
        """The wrapped causal LM, its adapter layers in place (as PEFT's get_base_model)."""
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside: the base model alone (every adapted layer returns its base output, no routing, no task
        encoder, auxiliary losses 0)."""
        previous, self._routing.adapters_enabled = self._routing.adapters_enabled, False
        try:
            yield
        finally:
            self._routing.adapters_enabled = previous

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        **options) -> None:
        """Activation checkpointing of the base model's decoder layers, e.g. {"use_reentrant": True} (both modes
        give the gradients of the plain forward). Inputs are made to require grad so that reentrant
        checkpointing passes gradients to the adapters of a frozen base. `options` (every_n_layers, offload:
        transformers >= 5) go to the base model as they are."""
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)  # transformers >= 5
        if enable is not None:
            enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **options)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                          **options)
        self.base_model.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **options) -> None:
        """The transformers < 5 name of `activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def activation_checkpointing_disable(self) -> None:
        disable = getattr(self.base_model, "activation_checkpointing_disable", None)
        (disable or self.base_model.gradient_checkpointing_disable)()

    gradient_checkpointing_disable = activation_checkpointing_disable  # the transformers < 5 name

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.base_model.modules())

    # ---- parameters -------------------------------------------------------------------------------------
    @staticmethod
    def is_b_matrix(name: str) -> bool:
        """True for the parameters that hold B matrices (trained at eta_b * lr, SPEC 5)."""
        return name.endswith(B_MATRIX_SUFFIX)

    def trainable_parameter_names(self) -> List[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def get_nb_trainable_parameters(self) -> Tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        """PEFT's line (trainable% of all parameters) plus the reference's rate (trainable / base parameters)."""
        trainable, total = self.get_nb_trainable_parameters()
        base = total - sum(p.numel() for p in self.adapter_named_parameters().values())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
              f" || of the base model: {100 * trainable / base:.4f}%")

    def layer_kinds(self) -> Dict[str, str]:
        """Routed-group owner name -> 'token' | 'hybrid' | 'task'."""
        return {group.name: group.router.kind for group in self._groups}

    def adapter_named_parameters(self) -> Dict[str, nn.Parameter]:
        """Every adapter parameter (trainable or not), named relative to the base model (as checkpoints store
        them): `<module>.lora_A`, `<module>.lora_B`, `<owner>.router.*`, `task_encoder.*`."""
        adapter_ids = set()
        for module in self.modules():
            if isinstance(module, AdapterLinear):
                adapter_ids.update({id(module.lora_A), id(module.lora_B)})
            if isinstance(module, (Router, TaskEncoder)):
                adapter_ids.update(id(p) for p in module.parameters())
        named = {}
        for name, param in self.named_parameters():
            if id(param) in adapter_ids:
                named[name[len("base_model."):] if name.startswith("base_model.") else name] = param
        return named

    def adapter_named_buffers(self) -> Dict[str, torch.Tensor]:
        """The adapter's non-parameter state, named as `adapter_named_parameters`: rank-wise routing's
        `<owner>.router.selection_bias`."""
        named = {}
        for name, module in self.base_model.named_modules():
            if isinstance(module, Router):
                named.update({f"{name}.{key}": buffer for key, buffer in module.named_buffers(recurse=False)})
        return named

    def adapter_state_tensors(self) -> Dict[str, torch.Tensor]:
        """What a checkpoint stores: every adapter parameter and buffer, by name."""
        return {**self.adapter_named_parameters(), **self.adapter_named_buffers()}

    def load_adapter_state_dict(self, state: Dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Copy adapter tensors in; every name and shape must match (errors name what does not fit).

        A scalar `router.alpha` (the reference's checkpoints, ours before alpha became 1-D for FSDP2) loads into
        the (1,) parameter."""
        params = self.adapter_state_tensors()
        state = {n: t.reshape(1) if t.dim() == 0 and n in params and tuple(params[n].shape) == (1,) else t
                 for n, t in state.items()}
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        wrong = [f"{n}: {tuple(state[n].shape)} in {source}, model needs {tuple(params[n].shape)}"
                 for n in sorted(set(params) & set(state)) if tuple(state[n].shape) != tuple(params[n].shape)]
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors the model does not have (e.g. {unexpected[:3]})")
        if wrong:
            problems.append("shape mismatches: " + "; ".join(wrong[:3]))
        if problems:
            raise ValueError(f"{source} does not fit this base model and config: " + ", ".join(problems)
                             + "; load it onto the base model and config it was saved with")
        with torch.no_grad():
            for name, param in params.items():
                value = state[name].to(device=param.device, dtype=param.dtype)
                if hasattr(param, "device_mesh"):  # FSDP2: this rank's shard of the whole tensor
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value, param.device_mesh, param.placements)
                param.copy_(value)

    # ---- task representation ----------------------------------------------------------------------------
    def task_representation(self, input_ids=None, attention_mask=None, labels=None, task_input_ids=None,
                            task_attention_mask=None) -> Optional[torch.Tensor]:
        """(B, d) task representation, or None without task routers.

        From `task_input_ids` (the raw source, left-padded) when given; otherwise from the prompt part of
        `input_ids`: the attended tokens whose label is -100 (all attended tokens when labels are absent).
        """
        if self.task_encoder is None:
            return None
        if task_input_ids is None:
            if input_ids is None:
                raise ValueError("task routing needs task_input_ids (or input_ids to take the prompt from)")
            task_input_ids, task_attention_mask = prompt_part(input_ids, attention_mask, labels)
        elif input_ids is not None and task_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"task_input_ids has {task_input_ids.shape[0]} rows but input_ids has "
                             f"{input_ids.shape[0]}; give one task source per sequence")
        if task_attention_mask is None:
            task_attention_mask = torch.ones_like(task_input_ids)
        if task_attention_mask.shape != task_input_ids.shape:
            raise ValueError(f"task_attention_mask {tuple(task_attention_mask.shape)} must have the shape of "
                             f"task_input_ids {tuple(task_input_ids.shape)}")
        embeds = self.base_model.get_input_embeddings()(task_input_ids)
        return self.task_encoder(embeds, task_attention_mask)

    def task_router_probs(self, task_repr: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Every task router applied to task_repr (B, d) outside a forward (reports; not under FSDP)."""
        if task_repr is None:
            return {}
        p = self.hmora_config.dropout
        return {g.name: g.router.task_probs(task_repr, p) for g in self._groups if g.router.kind != "token"}

    # ---- losses -----------------------------------------------------------------------------------------
    @property
    def num_token_routers(self) -> int:
        """Routers with a token side (task-only layers have none), each shared router once."""
        return sum(group.router.kind != "task" for group in self._groups)

    def variant_loss_terms(self, logits: torch.Tensor, attention_mask=None) -> Dict[str, torch.Tensor]:
        """One token router's routing-variant losses, unweighted, on its logits (B, S, E) over attended tokens.

        Each recomputes its selection from the token router's own p_tok = softmax(logits), as the authors' code
        does: "balance" E * sum_e f_e P_e (P the mean p_tok; f the fraction of tokens whose top-k (mixlora) or
        top-1 (switch, before the capacity drops) is e, or DynMoLE's mean gate value (top_p)); "z" (switch) the mean
        logsumexp(logits)^2; "entropy" (top_p) the mean normalised Tsallis entropy of p_tok. rank_wise: none."""
        config = self.hmora_config
        variant = config.routing_variant
        if variant == "rank_wise":
            return {}
        mask = torch.ones(logits.shape[:-1], device=logits.device) if attention_mask is None else attention_mask
        flat = logits.reshape(-1, logits.shape[-1])
        p_tok, gates = hmora_kernels.route(
            flat, top_k={"mixlora": config.top_k, "switch": 1}.get(variant), renorm="sum",
            rule=config.routing_rule("token") if variant == "top_p" else None, backend=config.backend)
        p_tok, gates = p_tok.view(logits.shape), gates.view(logits.shape)
        frequencies = "gate_values" if variant == "top_p" else "selected"
        terms = {"balance": hmora_kernels.load_balancing_loss(p_tok, gates, 1, mask, frequencies=frequencies,
                                                              backend=config.backend)}
        if variant == "switch":
            terms["z"] = hmora_kernels.router_z_loss(logits, mask, backend=config.backend)
        if variant == "top_p":
            terms["entropy"] = hmora_kernels.entropy_loss(p_tok, config.entropy_index, config.entropy_eps, mask,
                                                          backend=config.backend)
        return terms

    def router_aux_loss(self, logits: Optional[torch.Tensor], p_tok: torch.Tensor, gates: torch.Tensor,
                        attention_mask=None) -> torch.Tensor:
        """One token router's term of `aux_loss`, on its logits / p_tok / final gates (B, S, E) over attended tokens:
        GJS or load balancing, or under a routing variant its weighted losses over the number of token routers.

        Load balancing divides the expert frequencies by the config's `top_k` even under soft routing, as the
        reference does (SPEC 4)."""
        config = self.hmora_config
        if config.routing_variant is not None:
            weights = {"balance": config.balance_loss_coef, "z": config.router_z_loss_coef,
                       "entropy": config.entropy_loss_coef}
            terms = self.variant_loss_terms(logits, attention_mask)
            return sum((weights[name] * term for name, term in terms.items()), p_tok.new_zeros(())) \
                / self.num_token_routers
        mask = torch.ones(p_tok.shape[:-1], device=p_tok.device) if attention_mask is None else attention_mask
        if config.use_div_loss:
            return hmora_kernels.gjs_loss(p_tok, config.gamma_div_certain_t, config.gamma_div_balance_t, mask,
                                          backend=config.backend)
        if config.use_load_balancing_loss:
            return hmora_kernels.load_balancing_loss(p_tok, gates, config.top_k, mask, backend=config.backend)
        return p_tok.new_zeros(())

    def task_router_loss(self, p_task: torch.Tensor) -> torch.Tensor:
        """One task router's auxiliary loss: GJS over the batch of task weights p_task (N, E), gammas *_s."""
        config = self.hmora_config
        if not config.use_div_loss:
            return p_task.new_zeros(())
        return hmora_kernels.gjs_loss(p_task, config.gamma_div_certain_s, config.gamma_div_balance_s,
                                      backend=config.backend)

    def token_aux_loss(self, router_logits, router_probs, router_gates, attention_mask) -> torch.Tensor:
        """Sum of `router_aux_loss` over the token routers (task-only layers have none)."""
        total = torch.zeros((), device=self.device)
        for name, p_tok in router_probs.items():
            total = total + self.router_aux_loss(router_logits.get(name), p_tok, router_gates[name], attention_mask)
        return total

    def variant_loss_means(self, router_logits, attention_mask) -> Optional[Dict[str, torch.Tensor]]:
        """The unweighted variant losses, each a mean over the token routers, detached (None without a variant)."""
        if self.hmora_config.routing_variant is None:
            return None
        sums: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for logits in router_logits.values():
                for name, term in self.variant_loss_terms(logits, attention_mask).items():
                    sums[name] = sums.get(name, 0) + term
        return {name: total / len(router_logits) for name, total in sums.items()}

    def task_routers_loss(self, task_probs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Unweighted sum of `task_router_loss` over the task routers."""
        total = torch.zeros((), device=self.device)
        for p_task in task_probs.values():
            total = total + self.task_router_loss(p_task)
        return total

    def task_aux_loss(self, task_input_ids: torch.Tensor, task_attention_mask: Optional[torch.Tensor] = None):
        """lambda_auxiliary * sum over task routers of GJS over the task weights of these sources, computed
        outside a forward, for the reference recipe's separate backward in one process. Under DDP or FSDP pass the
        sources to the forward instead (`task_loss_input_ids`), whose loss then holds this term."""
        probs = self.task_router_probs(self.task_representation(task_input_ids=task_input_ids,
                                                                task_attention_mask=task_attention_mask))
        return self.hmora_config.lambda_auxiliary * self.task_routers_loss(probs)

    # ---- rank-wise routing's selection bias ----------------------------------------------------------------
    def update_routing_bias(self, process_group=None) -> Dict[str, torch.Tensor]:
        """Rank-wise routing (SMoRA's loss-free balancing), once per optimizer step, on every data-parallel rank:
        b_i += bias_update_rate * sign(mean(c) - c_i) for each router, c (E * r,) the real tokens that selected each
        rank-1 expert in the training forwards since the last call (the accumulation window; activation-checkpoint
        recomputations not counted), summed over the ranks of `process_group` (torch.distributed's default group
        when it is initialised), so every rank applies the same update. Returns the summed counts by router
        owner name ({} without rank-wise routing). `register_routing_bias_update(optimizer)` calls it for you."""
        groups = [group for group in self._groups if isinstance(group.rule, RankWise)]
        if not groups:
            return {}
        counts = torch.stack([group.take_selection_counts() for group in groups])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts, group=process_group)
        rate = self.hmora_config.bias_update_rate
        with torch.no_grad():
            for group, count in zip(groups, counts):
                count = count.to(torch.float64)
                bias = group.router.selection_bias
                bias += (rate * torch.sign(count.mean() - count)).to(bias.dtype)
        return {group.name: count for group, count in zip(groups, counts)}

    def register_routing_bias_update(self, optimizer: torch.optim.Optimizer):
        """Calls `update_routing_bias` after every `optimizer.step()` (e.g. the torch optimizer inside HF Trainer's
        or accelerate's wrapper, which steps it once per accumulation window). Returns the hook's handle."""
        return optimizer.register_step_post_hook(lambda *_: self.update_routing_bias())

    # ---- forward / generate -----------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, task_input_ids=None,
                task_attention_mask=None, task_loss_input_ids=None, task_loss_attention_mask=None,
                with_task_loss: bool = True, **kwargs) -> HMoRAOutput:
        """LM forward with routing. `labels` are unshifted (-100 = ignored); the shift happens here.

        The task representation comes from `task_input_ids`, or if absent from the prompt part of
        `input_ids` (attended tokens with label -100), see `task_representation`.

        The task routers' loss (`out.task_aux_loss`, inside `out.loss`): by default GJS over this batch's task
        weights, the very probabilities it was routed with (what HF Trainer, TRL and DDP optimise). Given
        `task_loss_input_ids` (and `task_loss_attention_mask`), over those sources instead, e.g. every source of an
        accumulation window (the reference recipe), with a task-encoder pass of their own. `with_task_loss=False`
        leaves it out. Either way it is computed inside this forward: under DDP its gradient is all-reduced, under
        FSDP every task router runs inside its own layer's forward.
        """
        kwargs.pop("num_items_in_batch", None)
        kwargs.pop("return_dict", None)  # we read the base model's output by name
        if labels is not None and input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        task_repr = None
        if self._routing.adapters_enabled:
            task_repr = self.task_representation(input_ids, attention_mask, labels, task_input_ids,
                                                 task_attention_mask)
        with_task_loss = with_task_loss and task_repr is not None
        loss_task_repr = None
        if task_loss_input_ids is not None and with_task_loss:
            loss_task_repr = self.task_representation(task_input_ids=task_loss_input_ids,
                                                      task_attention_mask=task_loss_attention_mask)
        loss_terms = {"token": lambda logits, p_tok, gates: self.router_aux_loss(logits, p_tok, gates, attention_mask)}
        if with_task_loss:
            loss_terms["task"] = self.task_router_loss
        task_reprs = {ROUTING_TASK: task_repr, LOSS_TASK: loss_task_repr}
        context = ForwardContext(task_reprs, record=True, attention_mask=attention_mask, loss_terms=loss_terms)
        if context.task_reprs and torch.is_grad_enabled() and self.is_activation_checkpointing:
            # reentrant checkpointing needs a path from the task representations into the layers (hmora.reentrant)
            embeds = kwargs.pop("inputs_embeds", None)
            if embeds is None:
                embeds = self.get_input_embeddings()(input_ids)
            names = tuple(context.task_reprs)
            kwargs["inputs_embeds"] = TaskGradBridge.apply(embeds, context, names,
                                                           *(context.task_reprs[n] for n in names))
            input_ids = None
        self._routing.install(context)  # stays installed for checkpoint recomputation (see hmora.context)
        try:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            router_logits, router_probs, router_gates = context.logits, context.p_tok, context.gates
            task_probs = context.task_probs
            loss_task_probs = context.loss_task_probs if loss_task_repr is not None else task_probs
            layers_without_grad = context.layers_without_grad
        finally:
            context.finish()
        config = self.hmora_config
        taps = layers_without_grad and torch.is_grad_enabled()
        aux_loss = self.token_aux_loss(router_logits, router_probs, router_gates, attention_mask)
        aux_loss = tap(aux_loss, context, "token") if taps else aux_loss
        task_aux_loss = self.task_routers_loss(loss_task_probs) if with_task_loss else None
        if task_aux_loss is not None and taps:
            task_aux_loss = tap(task_aux_loss, context, "task")
        ce_loss = loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            ce_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                      ignore_index=IGNORE_INDEX, label_smoothing=config.label_smoothing)
            if config.routing_variant is None:
                aux_total = aux_loss if task_aux_loss is None else aux_loss + task_aux_loss
                loss = config.lambda_lm * ce_loss + config.lambda_auxiliary * aux_total
            else:  # the variant's aux_loss carries its own weights; its task routers have no loss
                loss = config.lambda_lm * ce_loss + aux_loss
        return HMoRAOutput.extending(
            out, loss=loss, logits=out.logits, ce_loss=ce_loss, aux_loss=aux_loss,
            aux_loss_terms=self.variant_loss_means(router_logits, attention_mask), task_aux_loss=task_aux_loss,
            task_repr=task_repr, router_probs=router_probs, router_gates=router_gates, task_probs=task_probs,
        )

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, task_input_ids=None, task_attention_mask=None,
                 **kwargs):
        """`base_model.generate` with routing: the task weights are computed once from `task_input_ids` (or
        from the whole attended prompt) and held for every generated token."""
        task_repr = self.task_representation(input_ids, attention_mask, None, task_input_ids, task_attention_mask)
        previous = self._routing.install(ForwardContext({ROUTING_TASK: task_repr}, attention_mask=attention_mask))
        try:
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._routing.context.finish()
            self._routing.install(previous)

    # ---- persistence ------------------------------------------------------------------------------------
    def save_pretrained(self, directory, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                        is_main_process: bool = True, safe_serialization: bool = True, **_ignored) -> None:
        """hmora_adapter.safetensors + hmora_config.json, atomic. PEFT's keywords: `state_dict` (take the adapter
        tensors from this full state dict, e.g. gathered by FSDP), `is_main_process` (others only join the
        gathering), `safe_serialization` (only True: the weights are always safetensors)."""
        from .checkpoint import save_adapter

        if not safe_serialization:
            raise ValueError("save_pretrained(safe_serialization=False): hmora writes only safetensors; drop the "
                             "argument")
        save_adapter(self, directory, state_dict=state_dict, is_main_process=is_main_process)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory, is_trainable: bool = True) -> "HMoRAModel":
        """The adapter in `directory` on `base_model`. `is_trainable=False` (PEFT's default; ours is True, to
        resume training) freezes the adapter and puts the model in eval mode."""
        from .checkpoint import load_adapter

        return load_adapter(base_model, directory, is_trainable=is_trainable)

    def merge_and_unload(self) -> nn.Module:
        """Fold every plain-LoRA layer into its base Linear and return the base model.

        Refuses for routed layers: their update sum_e g_e(x) B_e A_e depends on the input through the gates,
        so no fixed weight equals it.
        """
        routed = [name for name, m in self.base_model.named_modules() if isinstance(m, ExpertLinear)]
        if routed:
            raise ValueError(f"merge_and_unload: {len(routed)} routed layers (e.g. {routed[0]}) have input-dependent "
                             f"gates and cannot be folded into a fixed weight; only plain-LoRA layers "
                             f"(target_modules_lora) can be merged")
        return self._replace_adapters(LoRALinear.merged_linear)

    def unload(self) -> nn.Module:
        """Put every original Linear back, the adapter dropped, and return the base model."""
        return self._replace_adapters(lambda module: module.base_layer)

    def _replace_adapters(self, replacement) -> nn.Module:
        for name, module in list(self.base_model.named_modules()):
            if isinstance(module, AdapterLinear):
                parent, _, leaf = name.rpartition(".")
                setattr(self.base_model.get_submodule(parent) if parent else self.base_model, leaf,
                        replacement(module))
        return self.base_model


def get_hmora_model(base_model: nn.Module, config: HMoRAConfig, tokenizer=None) -> HMoRAModel:
    """Inject HMoRA layers into `base_model` (in place) and freeze its own weights.

    `tokenizer` (optional) gives the id of `config.task_token` for the task token's initial embedding.
    """
    if not isinstance(config, HMoRAConfig):
        raise TypeError(f"get_hmora_model: expected an HMoRAConfig, got {type(config).__name__}")
    return HMoRAModel(base_model, config, tokenizer)
