"""The offline demo world: GSM8K-style problems, a word-level tokenizer and a tiny policy, all built on a CPU.

Everything a LenVM/RL experiment needs, without a network or a GPU:

- [`generate_demo_problems`]: seeded word problems with 2-4 arithmetic steps and small numbers, in GSM8K's
  `question` / `answer` (`... #### N`) format, plus metadata columns (`problems.py`);
- reference solutions in three styles (concise, explained, verbose with a random number of re-checks), so
  completion lengths are long-tailed and depend partly on the problem (`problems.py`);
- [`build_demo_tokenizer`]: a word-level tokenizer trained with `tokenizers`, every integer 0..199 one token
  (`tokenizer.py`);
- [`build_demo_world`]: SFT of a tiny Llama-style policy with TRL's `SFTTrainer` on that data, saved with its
  tokenizer and the train/test splits (`world.py`);
- [`measure_demo_policy`]: its accuracy and completion lengths on held-out problems (`measure.py`).

Build and measure from the command line (`__main__.py`):

    python -m lenvm_rl.demo build --output_dir outputs/demo/world --seed 0
    python -m lenvm_rl.demo measure --world_dir outputs/demo/world --output_dir outputs/demo
"""

from ..length_metrics import length_variance_explained
from .measure import measure_demo_policy
from .problems import (
    DEMO_INSTRUCTION,
    DEMO_MAX_VALUE,
    DEMO_NUM_STEPS,
    DEMO_STYLES,
    DEMO_SYSTEM_PROMPT,
    DEMO_THEMES,
    DemoProblem,
    demo_prompt,
    demo_rows,
    generate_demo_problems,
    write_demo_solution,
)
from .tokenizer import (
    DEMO_CHAT_TEMPLATE,
    DEMO_EOS_TOKEN,
    DEMO_MAX_INTEGER,
    DEMO_PAD_TOKEN,
    DEMO_SPECIAL_TOKENS,
    DEMO_UNK_TOKEN,
    build_demo_tokenizer,
)
from .world import DEMO_WORLD_FORMAT, DemoWorldConfig, build_demo_world

__all__ = [
    "DEMO_CHAT_TEMPLATE",
    "DEMO_EOS_TOKEN",
    "DEMO_INSTRUCTION",
    "DEMO_MAX_INTEGER",
    "DEMO_MAX_VALUE",
    "DEMO_NUM_STEPS",
    "DEMO_PAD_TOKEN",
    "DEMO_SPECIAL_TOKENS",
    "DEMO_STYLES",
    "DEMO_SYSTEM_PROMPT",
    "DEMO_THEMES",
    "DEMO_UNK_TOKEN",
    "DEMO_WORLD_FORMAT",
    "DemoProblem",
    "DemoWorldConfig",
    "build_demo_tokenizer",
    "build_demo_world",
    "demo_prompt",
    "demo_rows",
    "generate_demo_problems",
    "length_variance_explained",
    "measure_demo_policy",
    "write_demo_solution",
]
