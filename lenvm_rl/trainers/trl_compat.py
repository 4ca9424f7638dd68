"""What TRL scripts and callbacks expect of a trainer beyond training: the TRL-compatible surface of our trainers.

A TRL script ported by changing its import still calls the members TRL's own trainers had; this module holds them so
that the trainers' modules keep only their algorithm:

- [`TRLPPOCompatMixin`]: TRL 1.12 `PPOTrainer`'s public surface (sample tables, reference-model context, model card,
  Hub upload, its attribute names) for [`~lenvm_rl.PPOTrainer`] and, through it, [`~lenvm_rl.LenVMPPOTrainer`].
- [`lenvm_config_from`]: a plain TRL config (`trl.GRPOConfig`) turned into its LenVM subclass, for half-swapped scripts.
"""

import logging
import os
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from pathlib import Path

import pandas as pd
import torch.nn as nn
from accelerate.utils import gather_object
from transformers import TrainingArguments
from transformers.utils import is_rich_available
from trl.trainer.utils import get_config_model_id, use_adapter

from ..io import write_text_atomic
from ..model_cards import policy_model_card
from ..modeling import FILL_TOKEN_ID
from .length_critic import LengthCriticConfigMixin
from .ppo_rollouts import rollout_generation_config

logger = logging.getLogger(__name__)

__all__ = ["TRLPPOCompatMixin", "lenvm_config_from"]


class TRLPPOCompatMixin:
    r"""
    TRL 1.12 `PPOTrainer`'s public surface, for [`~lenvm_rl.PPOTrainer`] (put it first among the bases).

    Why a mixin and not more methods in `ppo.py`: that module reads as one PPO update, a numbered list of steps; the
    members here are what TRL scripts and callbacks call *around* training (the sample table of `generate_completions`,
    `null_ref_context`, the model card, `push_to_hub`, TRL's attribute names). They use only the trainer's public
    steps (`generate_rollouts`, `score_rollouts`), so they sit apart and [`~lenvm_rl.LenVMPPOTrainer`] inherits them
    unchanged; it adds its LenVM facts to the card through [`~TRLPPOCompatMixin.model_card_facts`].

    Attributes (TRL's names):
        policy_model, value_model: the policy and the task critic (unwrapped from DDP / DeepSpeed).
        reward_model: the first reward given as a model (a sequence classifier), or `None` with reward functions only.
        is_peft_model (`bool`): whether the policy is a PEFT model (its reference is the policy with adapters off).
        sample_generations_freq (`int`): updates between two sample tables (0: none), set by the trainer.
    """

    @property
    def policy_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def value_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).value_model

    @property
    def reward_model(self) -> nn.Module | None:
        return next((func for func in self.reward_funcs if isinstance(func, nn.Module)), None)

    @contextmanager
    def null_ref_context(self):
        """For a PEFT policy, the context in which it computes reference log-probabilities: its adapters disabled, or
        `ref_adapter_name` active; a no-op for a policy with a separate `ref_model`."""
        with use_adapter(self.policy_model, self.args.ref_adapter_name) if self.is_peft_model else nullcontext():
            yield

    # ------------------------------------------------------------------ sample tables

    def generate_completions(self, sampling: bool = False) -> pd.DataFrame | None:
        """Greedy completions of the eval set with their scores, TRL 1.12's sample table.

        Each completion is decoded greedily up to `response_length` tokens and cut after its stop token, then scored
        by [`~PPOTrainer.score_rollouts`] exactly as in training (the weighted rewards minus `missing_eos_penalty`).
        The first 5 rows are printed (with `rich` when installed, as plain text otherwise) on the main process, and the
        table is logged as `completions` to the `report_to` integrations TRL logs tables to (Weights & Biases, Trackio,
        Comet). During training it runs every `sample_generations_freq` updates with `sampling=True`.

        A collective: every process calls it. Each process decodes every `num_processes`-th row of the eval set (the
        same number of rows each, so at most `num_processes - 1` rows are left out, as TRL's `drop_last` did).

        Args:
            sampling (`bool`, *optional*, defaults to `False`):
                Decode only the first `per_device_eval_batch_size` rows of each process (TRL's name for the sample
                taken during training) instead of the whole eval set.

        Returns:
            `pandas.DataFrame` or `None`: the columns `query`, `model response` and `score` (all processes' rows), or
            `None` without an `eval_dataset`.
        """
        if self.eval_dataset is None:
            return None
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        indices = list(range(rank, len(self.eval_dataset) // world * world, world))
        chunk = self.args.per_device_eval_batch_size
        if sampling:
            indices = indices[:chunk]
        greedy = rollout_generation_config(
            max_new_tokens=self.args.response_length,
            do_sample=False,
            eos_token_id=self.stop_token_id,
            pad_token_id=FILL_TOKEN_ID,  # fed back to the policy after a row's stop token: a valid id (see PPOTrainer)
        )
        table = defaultdict(list)
        for start in range(0, len(indices), chunk):
            batch = self.generate_rollouts(
                [self.eval_dataset[i] for i in indices[start : start + chunk]], generation_config=greedy
            )
            scores = self.score_rollouts(batch)["scores"]
            table["query"] += self.processing_class.batch_decode(batch["queries"], skip_special_tokens=True)
            table["model response"] += self.processing_class.batch_decode(batch["completion_ids"])
            table["score"] += scores.float().cpu().tolist()
        table = pd.DataFrame({column: gather_object(values) for column, values in table.items()})
        if self.accelerator.is_main_process and len(table):
            self._show_completions(table)
        return table

    def _show_completions(self, table: pd.DataFrame) -> None:
        head = table.head(5)
        if is_rich_available():
            from trl.trainer.utils import print_prompt_completions_sample

            print_prompt_completions_sample(
                head["query"].tolist(),
                head["model response"].tolist(),
                {"score": head["score"].tolist()},
                None,
                self.state.global_step,
            )
        else:
            print(head.to_string())
        report_to = self.args.report_to or []
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"completions": wandb.Table(dataframe=table)})
        if "trackio" in report_to:
            import trackio

            trackio.log({"completions": trackio.Table(dataframe=table)})
        if "comet_ml" in report_to:
            from trl.trainer.utils import log_table_to_comet_experiment

            log_table_to_comet_experiment(name="completions.csv", table=table)

    # ------------------------------------------------------------------ model card and Hub

    def model_card_facts(self) -> dict[str, object]:
        """The training settings the model card lists; subclasses add theirs (the one hook of the card)."""
        args = self.args
        return {
            "trainer": f"`lenvm_rl.{type(self).__name__}`",
            "policy": "PEFT adapter (reference: adapter disabled)" if self.is_peft_model else "full fine-tuning",
            "rewards": ", ".join(f"`{name}`" for name in self.reward_func_names),
            "updates x rollouts per update": f"{self.num_updates} x {self.batch_size}",
            "response_length": args.response_length,
            "learning_rate": args.learning_rate,
            "kl_coef": args.kl_coef,
            "gamma": args.gamma,
            "lam": args.lam,
            "num_ppo_epochs": args.num_ppo_epochs,
        }

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """Write a TRL-style model card, `README.md`, into `args.output_dir` (TRL's signature).

        The card names the base model, the dataset, the training settings of [`~TRLPPOCompatMixin.model_card_facts`]
        (for [`~lenvm_rl.LenVMPPOTrainer`]: the LenVM, its gamma, `length_mode` and `length_coef`), the framework
        versions and the citations (PPO, the Length Value Model, TRL). Only the main process writes.

        Args:
            model_name (`str`, *optional*): the card's title; defaults to the output directory's name.
            dataset_name (`str`, *optional*): the training dataset's Hub id.
            tags (`str` or `list[str]`, *optional*): Hub tags, added to the trainer's own.
        """
        if self.is_world_process_zero():
            self._write_model_card(self.args.output_dir, model_name, dataset_name, tags)

    def _write_model_card(self, directory: str, model_name=None, dataset_name=None, tags=None) -> None:
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        card = policy_model_card(
            model_name=model_name or Path(directory).absolute().name,
            base_model=get_config_model_id(self.policy_model.config),
            dataset_name=dataset_name,
            model_id=self.hub_model_id or str(directory),
            tags=sorted({*tags, *self._tag_names}),
            trainer_name=type(self).__name__,
            facts=self.model_card_facts(),
        )
        os.makedirs(directory, exist_ok=True)
        write_text_atomic(os.path.join(directory, "README.md"), card)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` (the policy at the top, the critic in `value_model/`) plus the model card."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self._write_model_card(output_dir if output_dir is not None else self.args.output_dir)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        **kwargs,
    ):
        """Save the model into `args.output_dir`, write its card (with `dataset_name` and `tags`) and upload the folder
        to `args.hub_model_id` (`checkpoint-*` folders excluded): `Trainer.push_to_hub` with TRL's card arguments.

        Args:
            commit_message, blocking, token, revision, private: as in `Trainer.push_to_hub`.
            dataset_name (`str`, *optional*): the training dataset's Hub id, for the card.
            tags (`str` or `list[str]`, *optional*): extra Hub tags, for the card.
            **kwargs: passed on (`model_name`, the card's title).
        """
        # By keyword: transformers < 5.24 has no `private` parameter (it travels in **kwargs there).
        if private is not None:
            kwargs["private"] = private
        return super().push_to_hub(
            commit_message=commit_message,
            blocking=blocking,
            token=token,
            revision=revision,
            dataset_name=dataset_name,
            tags=tags,
            **kwargs,
        )


def lenvm_config_from(args: TrainingArguments, config_class: type) -> TrainingArguments:
    """`args`, a TRL config, as an instance of its LenVM subclass `config_class` with the length fields at their defaults.

    Every value of `args` is kept as it is after its `__post_init__`; re-running that on the filled-in values would be
    wrong (TRL's `GRPOConfig` derives `generation_batch_size` from `steps_per_generation` and then refuses both set).
    The defaults make the length term off (`length_coef=0`), so a warning names how to set it.

    Args:
        args ([`~transformers.TrainingArguments`]): the config the script built, e.g. a `trl.GRPOConfig`.
        config_class (`type`): the LenVM config, a subclass of `type(args)` and of
            [`~lenvm_rl.trainers.length_critic.LengthCriticConfigMixin`], e.g. [`~lenvm_rl.LenVMGRPOConfig`].
    """
    trl_config_class = next(base for base in config_class.__bases__ if base is not LengthCriticConfigMixin)
    if not isinstance(args, trl_config_class):
        raise ValueError(
            f"Expected a {config_class.__name__} (or a {trl_config_class.__name__}) as `args`, got "
            f"{type(args).__name__}."
        )
    converted = object.__new__(config_class)
    converted.__dict__.update(vars(args))
    for length_field in fields(LengthCriticConfigMixin):
        setattr(converted, length_field.name, length_field.default)
    logger.warning(
        "Got a %s as `args`: converted to %s with the length fields at their defaults (length_coef=0, no LenVM "
        "path), i.e. plain RL unless a LenVM is passed and length_coef is set. To set them, build a %s (in TRL's "
        "scripts: import it as the config class in make_parser(); see docs/trl_compatibility.md).",
        type(args).__name__,
        config_class.__name__,
        config_class.__name__,
    )
    return converted
