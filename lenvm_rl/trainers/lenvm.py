"""LenVMTrainer: value pretraining of a Length Value Model on sampled completions (paper section 3)."""

import logging
import math
import os
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments, set_seed

from ..core import gamma_for_length
from ..modeling import FILL_TOKEN_ID, VALUE_HEAD_NAME, LengthValueModel
from ..targets import LenVMDataCollator, tokenize_rollouts
from .checkpointing import CompleteCheckpointsMixin

logger = logging.getLogger(__name__)

__all__ = ["LenVMConfig", "LenVMTrainer"]


@dataclass
class LenVMConfig(TrainingArguments):
    r"""Configuration of [`LenVMTrainer`]: `transformers.TrainingArguments` plus the LenVM knobs.

    Defaults that differ from `TrainingArguments` follow the paper (section 3 of the method doc): learning rate
    2e-5 with a cosine schedule, 2 epochs.

    Parameters:
        gamma (`float` or `None`, *optional*, defaults to `None`):
            Discount of the length returns. `None` chooses it from the training lengths with the paper's rule
            `1 - gamma^L_q = gamma_coverage`, `L_q` the `gamma_percentile`-th percentile (logged).
        gamma_percentile (`float`, *optional*, defaults to `99.0`):
            Percentile of the training completion lengths used when `gamma` is `None`.
        gamma_coverage (`float`, *optional*, defaults to `0.99`):
            Fraction of the value range used up at that percentile.
        max_prompt_length (`int` or `None`, *optional*, defaults to `512`):
            Longer prompts are truncated from the left (the assistant header stays); targets never shift.
        max_length (`int` or `None`, *optional*, defaults to `4096`):
            Window of prompt + completion; a longer completion keeps its first tokens with exact targets.
        include_truncated (`bool`, *optional*, defaults to `False`):
            Keep completions cut at the sampling cap, with targets bootstrapped from the model's own value at the
            cut (detached). By default they are dropped and counted: their true length is unknown.
        padding_free (`bool`, *optional*, defaults to `False`):
            Pack the sequences of a batch into one row (no compute on padding); same loss and gradients.
        reuse_token_ids (`bool`, *optional*, defaults to `True`):
            Train on the sampled token ids (exact when the LenVM shares the policy's tokenizer) instead of
            re-tokenising the text with the LenVM's tokenizer.
        model_init_kwargs (`dict` or `None`, *optional*, defaults to `None`):
            Keyword arguments for loading the backbone when `model` is a path (`dtype`, `attn_implementation`, ...).
        trainable_layers (`int` or `None`, *optional*, defaults to `None`):
            Train only the value head, the backbone's final norm and its last N decoder layers (the embeddings and
            earlier layers stay frozen): a CPU-sized LenVM of a 100M+ backbone. `None` trains everything (the
            paper's full fine-tune). Not combined with LoRA.
    """

    gamma: float | None = field(
        default=None,
        metadata={"help": "Discount of the length returns; None picks it by the percentile rule (logged)."},
    )
    gamma_percentile: float = field(
        default=99.0, metadata={"help": "Percentile of training lengths used when gamma is None."}
    )
    gamma_coverage: float = field(default=0.99, metadata={"help": "1 - gamma^L_percentile when gamma is None."})
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Truncate longer prompts from the left (assistant header kept)."}
    )
    max_length: int | None = field(default=4096, metadata={"help": "Window of prompt + completion tokens."})
    include_truncated: bool = field(
        default=False,
        metadata={"help": "Keep completions cut at the sampling cap, with bootstrapped targets."},
    )
    padding_free: bool = field(default=False, metadata={"help": "Pack sequences end to end instead of padding."})
    reuse_token_ids: bool = field(
        default=True, metadata={"help": "Use the sampled token ids instead of re-tokenising the text."}
    )
    model_init_kwargs: dict | None = field(
        default=None, metadata={"help": "Backbone loading kwargs (dtype, attn_implementation) when model is a path."}
    )
    trainable_layers: int | None = field(
        default=None,
        metadata={"help": "Train only the head, final norm and last N decoder layers (None: everything)."},
    )
    # Paper defaults (method doc section 3).
    learning_rate: float = field(default=2e-5, metadata={"help": "Initial learning rate (paper: 2e-5)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Scheduler (paper: cosine)."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs (paper: 2)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs the LenVM columns."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.gamma is not None and not 0 < self.gamma < 1:
            raise ValueError(f"--gamma must be in (0, 1) or None (percentile rule), got {self.gamma}")
        if not 0 < self.gamma_percentile <= 100:
            raise ValueError(f"--gamma_percentile must be in (0, 100], got {self.gamma_percentile}")
        # A window of 0 or 1 tokens holds no completion token: the LenVM would train on no target at all.
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(
                f"--max_length must be at least 2 (a prompt token and a completion token) or None, got {self.max_length}"
            )
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"--max_prompt_length must be at least 1 or None, got {self.max_prompt_length}")
        if self.trainable_layers is not None and self.trainable_layers < 0:
            raise ValueError(
                f"--trainable_layers must be >= 0 or None (train everything), got {self.trainable_layers}"
            )


class LenVMTrainer(CompleteCheckpointsMixin, Trainer):
    """Trains a [`LengthValueModel`] to regress the dense length returns of sampled completions.

    The loss is the token-averaged squared error over **all target tokens of the optimizer step**, gradient
    accumulation and processes included: ``sum_i (V_i - G_i)^2 / N_step``, not a per-sequence mean (a weight that
    depends on the future, such as ``1/L``, would change the regression target; paper appendix E).

    Args:
        model (`LengthValueModel` or `str`):
            A LenVM, a LenVM checkpoint path (ours or the reference format), or a causal-LM path/id to initialise
            a LenVM from (a fresh value head on the backbone; typically the policy itself).
        args ([`LenVMConfig`], *optional*):
            Training configuration.
        train_dataset (`datasets.Dataset`):
            Rollout records (see ``recipes/sample_rollouts.py``) or examples already passed through
            [`tokenize_rollouts`].
        eval_dataset (`datasets.Dataset`, *optional*):
            Same format; its loss is the value MSE.
        processing_class (`PreTrainedTokenizerBase`, *optional*):
            The LenVM's tokenizer; needed to re-tokenise text and saved with every checkpoint.
        peft_config (`peft.PeftConfig`, *optional*):
            LoRA on the backbone; the value head stays fully trainable. Saved checkpoints hold merged weights.
    """

    def __init__(
        self,
        model,
        args: LenVMConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        args = args or LenVMConfig(output_dir="lenvm-output")
        if train_dataset is None:
            raise ValueError("LenVMTrainer needs a `train_dataset` of rollout records.")
        train_dataset = self._prepare_dataset(train_dataset, processing_class, args)
        if eval_dataset is not None:
            eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args)

        model, gamma = self._resolve_model_and_gamma(model, train_dataset, args)
        if peft_config is not None and args.trainable_layers is not None:
            raise ValueError("Use either LoRA (--use_peft) or --trainable_layers, not both.")
        if peft_config is not None:
            model = model.apply_lora(peft_config)
        if args.trainable_layers is not None:
            train_last_layers(model, args.trainable_layers)

        # Padding is never attended to nor targeted, but it is embedded: a packed batch has no mask to fill it by, and
        # the tokenizer's pad id may lie past the vocabulary (a `[PAD]` added without resizing), so write a valid id.
        collator = LenVMDataCollator(gamma=gamma, pad_token_id=FILL_TOKEN_ID, padding_free=args.padding_free)
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # compute_loss normalises by the target count of the whole optimizer step (see _get_num_items_in_batch).
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    @staticmethod
    def _prepare_dataset(dataset, processing_class, args):
        if "completion_start" in dataset.column_names:
            return dataset
        return tokenize_rollouts(
            dataset,
            tokenizer=processing_class,
            max_prompt_length=args.max_prompt_length,
            max_length=args.max_length,
            include_truncated=args.include_truncated,
            reuse_token_ids=args.reuse_token_ids,
        )

    @staticmethod
    def _resolve_model_and_gamma(model, train_dataset, args):
        """Gamma comes from the config, else from a saved LenVM, else from the percentile rule on the data."""
        is_lenvm_dir = isinstance(model, (str, os.PathLike)) and os.path.isfile(os.path.join(model, VALUE_HEAD_NAME))
        if isinstance(model, (str, os.PathLike)) and not is_lenvm_dir:
            gamma = args.gamma if args.gamma is not None else _gamma_from_lengths(train_dataset, args)
            # The value head is initialised here, before Trainer seeds the run: seed it, so a run is reproducible.
            set_seed(args.seed)
            return LengthValueModel.from_backbone(model, gamma=gamma, **(args.model_init_kwargs or {})), gamma
        if is_lenvm_dir:
            model = LengthValueModel.from_pretrained(model, gamma=args.gamma, **(args.model_init_kwargs or {})).train()
        if args.gamma is not None and not math.isclose(model.gamma, args.gamma, rel_tol=0, abs_tol=1e-12):
            raise ValueError(
                f"The LenVM was built with gamma={model.gamma} but --gamma={args.gamma}: every target would change. "
                "Pass --gamma to match, or start from the backbone with LengthValueModel.from_backbone."
            )
        return model, model.gamma

    def _get_num_items_in_batch(self, batch_samples, device):
        # Target tokens of the whole optimizer step, summed over accumulation micro-batches and processes.
        count = sum(batch["target_mask"].sum() for batch in batch_samples).to(device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        values = model(**model_inputs).values.double()  # (B, T), or (1, N) packed
        targets = inputs["length_targets"]
        if "bootstrap_discounts" in inputs:
            # Censored rows: G_t = -(1 - g^(L-t)) + g^(L-t) * V(s_L), with V(s_L) from the current model, detached.
            tail = values.detach().reshape(-1)[inputs["bootstrap_index"]]
            targets = targets + inputs["bootstrap_discounts"] * tail
        mask = inputs["target_mask"]
        squared_error = ((values - targets) ** 2 * mask).sum()
        if num_items_in_batch is None:  # evaluation: this batch alone
            loss = squared_error / mask.sum().clamp(min=1)
        else:
            # DDP averages gradients over processes; multiplying by their number makes the step's gradient the
            # gradient of sum / N_step over all processes.
            loss = squared_error / num_items_in_batch * self.accelerator.num_processes
        loss = loss.float()
        return (loss, values) if return_outputs else loss

    def _save(self, output_dir=None, state_dict=None):
        # Every checkpoint is a loadable LenVM in the reference layout plus our metadata.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        # The last evaluation's figures go into lenvm_config.json and the model card.
        evaluations = [log for log in self.state.log_history if "eval_loss" in log]
        metrics = (
            {key: value for key, value in evaluations[-1].items() if key.startswith("eval_")} if evaluations else None
        )
        model.save_pretrained(output_dir, tokenizer=self.processing_class, metrics=metrics)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        loaded = LengthValueModel.from_pretrained(resume_from_checkpoint)
        model.load_state_dict(loaded.state_dict())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation reports the value MSE of each batch; there are no logits or labels to return.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def _gamma_from_lengths(dataset, args) -> float:
    lengths = torch.tensor([n for n, done in zip(dataset["completion_length"], dataset["terminated"]) if done])
    if len(lengths) == 0:
        raise ValueError("Cannot choose gamma: no finished completion in the training data. Pass --gamma.")
    quantile = float(torch.quantile(lengths.double(), args.gamma_percentile / 100))
    gamma = gamma_for_length(max(quantile, 1.0), args.gamma_coverage)
    logger.warning(
        "gamma=%.6f chosen so that 1 - gamma^%.0f = %.2f (%gth percentile of %d training lengths).",
        gamma,
        quantile,
        args.gamma_coverage,
        args.gamma_percentile,
        len(lengths),
    )
    return gamma


def train_last_layers(model, num_layers: int) -> None:
    """Freeze the LenVM's backbone except its final norm and last `num_layers` decoder layers (the head stays
    trainable); see [`train_last_decoder_layers`]."""
    train_last_decoder_layers(model.backbone, num_layers)
    model.v_head.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("Training the value head and the last %d layers: %d of %d parameters.", num_layers, trainable, total)


def train_last_decoder_layers(backbone: torch.nn.Module, num_layers: int) -> None:
    """Freeze a decoder-only backbone (embeddings included) except its final norm and last `num_layers` decoder
    layers. transformers' decoder-only backbones keep their layers in `.layers` (Llama, Qwen2, Mistral, ...).
    Backpropagation then stops at the first trainable layer, which is what makes it cheaper than LoRA on a CPU."""
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"--trainable_layers needs a backbone with a `.layers` list of decoder layers; {type(backbone).__name__} "
            "has none. Train everything (unset it) or use LoRA."
        )
    if num_layers > len(layers):
        raise ValueError(f"--trainable_layers {num_layers} exceeds the backbone's {len(layers)} layers.")
    backbone.requires_grad_(False)
    for layer in list(layers)[len(layers) - num_layers :]:
        layer.requires_grad_(True)
    if getattr(backbone, "norm", None) is not None:
        backbone.norm.requires_grad_(True)
