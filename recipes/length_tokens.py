"""Length tokens (paper section 5): which tokens make a LenVM's predicted horizon jump, plus a per-token hover page.

    python recipes/length_tokens.py --lenvm_path outputs/demo/lenvm --rollouts outputs/demo/rollouts/eval \
        --output_dir outputs/demo/length_tokens

Runs the LenVM over rollout records (`prompt_ids`, `completion_ids`, `finish_reason`), computes the TD residual of
every completion token (`lenvm_rl.length_tokens.completion_td_residuals`; the value after a stop token is 0), and
counts per token how often ``delta < -threshold`` (lengthens the predicted continuation) or ``delta > threshold``
(shortens it). The default threshold is the paper's 0.01 at gamma = 0.997 rescaled to the LenVM's gamma
(`default_length_token_threshold`), since residuals scale with ``1 - gamma``. Writes `length_tokens.json`,
`length_tokens.csv`, `length_tokens.png` and `completion.html` (one completion, predicted remaining length on hover).
"""

import csv
import io
from dataclasses import asdict
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoTokenizer
from trl import TrlParser

from lenvm_rl.configs import LengthTokensArguments
from lenvm_rl.evaluation import start_evaluation
from lenvm_rl.io import write_json_atomic, write_text_atomic
from lenvm_rl.length_tokens import (
    completion_td_residuals,
    count_length_tokens,
    default_length_token_threshold,
    length_tokens_html,
    top_length_tokens,
)
from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.rollouts import load_rollouts

OUTPUTS = ["length_tokens.json", "length_tokens.csv", "length_tokens.png", "completion.html"]


@torch.no_grad()
def state_values_of(lenvm, records, batch_size: int) -> list[torch.Tensor]:
    """``V(s_0) .. V(s_L)`` of each record: the values at the last prompt token and at every completion token."""
    out = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        sequences = [r["prompt_ids"] + r["completion_ids"] for r in batch]
        width = max(map(len, sequences))
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)  # right padding: values of real tokens unchanged
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, seq in enumerate(sequences):
            input_ids[i, : len(seq)], attention_mask[i, : len(seq)] = torch.tensor(seq), 1
        values = lenvm(input_ids, attention_mask=attention_mask).values.double()  # (B, T)
        for i, r in enumerate(batch):
            P, L = len(r["prompt_ids"]), len(r["completion_ids"])
            out.append(values[i, P - 1 : P + L])  # (L + 1,)
    return out


def main(script_args: LengthTokensArguments) -> dict:
    inputs = {key: getattr(script_args, key) for key in ("lenvm_path", "rollouts", "tokenizer_path")}
    run, finished = start_evaluation(script_args, "length_tokens", inputs, outputs=OUTPUTS)
    if finished is not None:
        return finished
    lenvm = LengthValueModel.from_pretrained(script_args.lenvm_path, gamma=script_args.gamma).eval()
    tokenizer = AutoTokenizer.from_pretrained(script_args.tokenizer_path or script_args.lenvm_path)
    path = Path(script_args.rollouts)
    dataset = load_rollouts(path) if path.is_dir() else load_dataset("json", data_files=str(path), split="train")
    columns = ["prompt_ids", "completion_ids", "finish_reason"]
    records = dataset.select(range(min(script_args.max_completions, len(dataset)))).select_columns(columns).to_list()
    records = [r for r in records if r["prompt_ids"] and r["completion_ids"]]
    gamma = lenvm.gamma
    threshold = script_args.threshold if script_args.threshold is not None else default_length_token_threshold(gamma)

    # 1. Values and residuals of every completion token.
    state_values = state_values_of(lenvm, records, script_args.batch_size)
    residuals = [
        completion_td_residuals(v, gamma, terminated=r["finish_reason"] == "stop")
        for v, r in zip(state_values, records)
    ]
    # 2. Count and rank.
    stats = count_length_tokens([r["completion_ids"] for r in records], residuals, threshold)
    all_residuals = torch.cat(residuals)

    def rows(direction):
        return [
            {"token": tokenizer.convert_ids_to_tokens(token), "token_id": token, **entry,
             "rate": entry[direction] / entry["count"]}
            for token, entry in top_length_tokens(stats, direction, script_args.top_n, script_args.min_count)
        ]  # fmt: skip

    results = {
        "args": asdict(script_args),
        "gamma": gamma,
        "threshold": threshold,
        "num_completions": len(records),
        "num_tokens": int(all_residuals.numel()),
        "fraction_lengthen": float((all_residuals < -threshold).double().mean()),
        "fraction_shorten": float((all_residuals > threshold).double().mean()),
        "residual_quantiles": {f"{q:.0%}": float(all_residuals.quantile(q)) for q in (0.01, 0.05, 0.5, 0.95, 0.99)},
        "lengthen": rows("lengthen"),
        "shorten": rows("shorten"),
    }

    output_dir = Path(script_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / "length_tokens.json", results)
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["direction", "token", "token_id", "count", "lengthen", "shorten", "rate", "mean_delta"])
    for direction in ("lengthen", "shorten"):
        for r in results[direction]:
            writer.writerow([direction, r["token"], r["token_id"], r["count"], r["lengthen"], r["shorten"],
                             f"{r['rate']:.4f}", f"{r['mean_delta']:.6f}"])  # fmt: skip
    write_text_atomic(output_dir / "length_tokens.csv", table.getvalue())
    plot_length_tokens(results, output_dir / "length_tokens.png")

    # 3. One completion as a hover page.
    record, values = records[script_args.html_index], state_values[script_args.html_index]
    if record["finish_reason"] == "stop":
        values = values.clone()
        values[-1] = 0.0
    ids = record["completion_ids"]
    pieces = [tokenizer.decode(ids[: i + 1])[len(tokenizer.decode(ids[:i])) :] for i in range(len(ids))]
    page = length_tokens_html(
        pieces, values, gamma, threshold, title="LenVM: predicted remaining length per token",
        prompt=tokenizer.decode(record["prompt_ids"]),
    )  # fmt: skip
    write_text_atomic(output_dir / "completion.html", page)

    print(f"gamma {gamma:.4g}, threshold |delta| > {threshold:.4g}; {results['num_tokens']} tokens of "
          f"{len(records)} completions: {results['fraction_lengthen']:.2%} lengthen, "
          f"{results['fraction_shorten']:.2%} shorten")  # fmt: skip
    for direction in ("lengthen", "shorten"):
        print(f"\nmost often {direction}:\n{'token':<16} {'count':>6} {direction:>9} {'rate':>6} {'mean delta':>11}")
        for r in results[direction]:
            print(f"{r['token']!r:<16} {r['count']:>6} {r[direction]:>9} {r['rate']:>6.2f} {r['mean_delta']:>11.4f}")
    print(f"\nWrote {output_dir}/length_tokens.{{json,csv,png}} and {output_dir}/completion.html")
    run.complete()
    return results


def plot_length_tokens(results: dict, path: Path) -> None:
    """Horizontal bars: the tokens that most often lengthen (left) and shorten (right) the predicted length."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, without touching pyplot's backend

    height = 0.3 * max(len(results["lengthen"]), len(results["shorten"]), 5) + 1.5
    figure = Figure(figsize=(11, height), layout="constrained")
    for ax, direction, color in zip(figure.subplots(1, 2), ("lengthen", "shorten"), ("tab:red", "tab:green")):
        rows = results[direction][::-1]
        ax.barh([repr(r["token"]) for r in rows], [r[direction] for r in rows], color=color)
        sign = "delta < -" if direction == "lengthen" else "delta > "
        ax.set(xlabel=f"occurrences with {sign}{results['threshold']:.3g}",
               title=f"tokens that most often {direction} the predicted length")  # fmt: skip
    figure.suptitle(f"LenVM length tokens ({results['num_tokens']} tokens, gamma={results['gamma']:.4g})")
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    (script_args,) = TrlParser(LengthTokensArguments).parse_args_and_config()
    main(script_args)
