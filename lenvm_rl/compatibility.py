"""Whether a LenVM can serve a policy: it reads the policy's token ids directly, so their tokenizers must agree.

Used wherever a LenVM meets a policy: the RL trainers (`lenvm=` / `--lenvm_model_name_or_path`), guided decoding and
[`~lenvm_rl.load_frozen_lenvm`].
"""

import logging

logger = logging.getLogger(__name__)

__all__ = ["check_lenvm_reads_policy_ids", "check_tokenizers_compatible"]


def check_tokenizers_compatible(policy_tokenizer, lenvm_tokenizer) -> None:
    """Raise if a LenVM cannot read the policy's token ids.

    The LenVM consumes the policy's ids directly, so both tokenizers must map every token to the same id and
    agree on the EOS (which ends an episode) and padding ids.

    Args:
        policy_tokenizer (`transformers.PreTrainedTokenizerBase`):
            Tokenizer of the policy being trained.
        lenvm_tokenizer (`transformers.PreTrainedTokenizerBase`):
            Tokenizer saved with the LenVM.

    Raises:
        `ValueError`: listing the vocabulary size, a few differing token-to-id mappings and the special ids
            that differ.
    """
    problems = []
    if len(policy_tokenizer) != len(lenvm_tokenizer):
        problems.append(f"vocabulary size {len(policy_tokenizer)} (policy) vs {len(lenvm_tokenizer)} (LenVM)")
    policy_vocab, lenvm_vocab = policy_tokenizer.get_vocab(), lenvm_tokenizer.get_vocab()
    differing = sorted(
        token
        for token in policy_vocab.keys() | lenvm_vocab.keys()
        if policy_vocab.get(token) != lenvm_vocab.get(token)
    )
    if differing:
        examples = ", ".join(
            f"{token!r}: {policy_vocab.get(token)} vs {lenvm_vocab.get(token)}" for token in differing[:5]
        )
        problems.append(f"{len(differing)} token->id mappings differ (policy vs LenVM), e.g. {examples}")
    for name in ("eos_token_id", "pad_token_id"):
        policy_id, lenvm_id = getattr(policy_tokenizer, name), getattr(lenvm_tokenizer, name)
        if policy_id != lenvm_id:
            problems.append(f"{name} {policy_id} (policy) vs {lenvm_id} (LenVM)")
    if problems:
        raise ValueError(
            "The policy and LenVM tokenizers are incompatible: "
            + "; ".join(problems)
            + ". The LenVM reads the policy's token ids, so use a LenVM trained with the policy's tokenizer "
            "(or pretrain one from the policy with LengthValueModel.from_backbone)."
        )


def check_lenvm_reads_policy_ids(lenvm, policy_tokenizer, lenvm_tokenizer) -> None:
    """Raise unless the LenVM can read the policy's ids (embedding size; vocabularies when its tokenizer is known).

    The pad id is left out of the embedding check: padding is embedded as a valid id
    ([`~lenvm_rl.modeling.fill_padding`]), so a `[PAD]` added past the vocabulary (TRL's PPO recipe) is fine.
    """
    num_embeddings = lenvm.backbone.get_input_embeddings().num_embeddings
    read_ids = [i for i in policy_tokenizer.get_vocab().values() if i != policy_tokenizer.pad_token_id]
    if num_embeddings <= max(read_ids):
        raise ValueError(
            f"The LenVM embeds {num_embeddings} token ids but the policy's tokenizer has ids up to {max(read_ids)}: "
            "the LenVM reads the policy's ids, so use a LenVM trained with the policy's tokenizer."
        )
    if lenvm_tokenizer is not None:
        check_tokenizers_compatible(policy_tokenizer, lenvm_tokenizer)
    else:
        logger.warning(
            "No tokenizer came with the LenVM: only its embedding size was checked against the policy's tokenizer. "
            "Pass `lenvm_processing_class` to check the vocabularies."
        )
