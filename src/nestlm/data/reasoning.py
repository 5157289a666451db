"""A synthetic reasoning task for budget control: multi-step modular arithmetic with a worked trace.

    Q:3+5-9+2=?
    <think>3+5=8 8-9=9 9+2=1</think>A:1<eos>

Each step folds the next operand into a running value, modulo 10**digits (so every number keeps a fixed
width: with digits=2, "07+58=65 65-81=84"). The answer is a function of every operand, so answering without
the trace means doing all steps at once, while each step of the trace is one small table lookup: thinking
helps. Difficulty is the number of operands (`terms`), their width (`digits`) and the operators (`ops`).

    task = TaskConfig(terms=(4, 6))
    problems = sample_problems(task, 1000, seed=0, split="train")      # deterministic in (task, n, seed, split)
    text = format_example(problems[0])                                 # prompt + trace + answer
    ok = score(problems[0], generated_text)                            # parse "A:<n>" and compare

Train and test problems never coincide: a problem belongs to the test split when a hash of its question
falls in the last `test_frac` of the hash range, whatever the seed.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

import torch

from nestlm.errors import ConfigError

THINK_START, THINK_END, ANSWER = "<think>", "</think>", "A:"
_ANSWER_RE = re.compile(r"A:\s*(\d+)")

__all__ = ["ANSWER", "THINK_END", "THINK_START", "Problem", "TaskConfig", "cut_points", "encode_examples", "format_answer", "format_example",
           "format_prompt", "format_trace", "parse_answer", "sample_problems", "score"]


@dataclass(frozen=True)
class TaskConfig:
    terms: tuple[int, int] = (4, 6)  # number of operands: drawn uniformly in [min, max]
    digits: int = 1  # operand width; all arithmetic is modulo 10**digits
    ops: str = "+-"  # operators to draw from ('+', '-'; left to right equals Python's reading)
    test_frac: float = 0.1  # share of the problem space reserved for the test split

    def __post_init__(self):
        object.__setattr__(self, "terms", tuple(int(x) for x in self.terms))
        lo, hi = self.terms
        if not 2 <= lo <= hi:
            raise ConfigError(f"TaskConfig.terms must be (min, max) with 2 <= min <= max, got {self.terms}")
        if not 1 <= self.digits <= 4:
            raise ConfigError(f"TaskConfig.digits must be in 1..4, got {self.digits}")
        if not self.ops or set(self.ops) - set("+-"):
            raise ConfigError(f"TaskConfig.ops must be a non-empty string of '+' and '-', got {self.ops!r}")
        if not 0 < self.test_frac < 1:
            raise ConfigError(f"TaskConfig.test_frac must be in (0, 1), got {self.test_frac}")

    @property
    def modulus(self) -> int:
        return 10 ** self.digits


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]  # operands, each in [0, modulus)
    ops: tuple[str, ...]  # len(terms) - 1 operators
    digits: int

    @property
    def modulus(self) -> int:
        return 10 ** self.digits

    def num(self, v: int) -> str:
        return f"{v:0{self.digits}d}"

    @property
    def expression(self) -> str:
        """'3+5-9+2' (fixed-width operands)."""
        return self.num(self.terms[0]) + "".join(o + self.num(t) for o, t in zip(self.ops, self.terms[1:], strict=True))

    def steps(self) -> list[tuple[int, str, int, int]]:
        """The worked trace: (running value, operator, operand, new running value) per step."""
        out, acc = [], self.terms[0]
        for o, t in zip(self.ops, self.terms[1:], strict=True):
            new = _apply(acc, o, t) % self.modulus
            out.append((acc, o, t, new))
            acc = new
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


# ---------------------------------------------------------------------------------------------- sampling
def _is_test(p: Problem, test_frac: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(p.expression.encode(), digest_size=8).digest(), "big")
    return h / 2 ** 64 >= 1 - test_frac


def sample_problems(task: TaskConfig, n: int, seed: int = 0, split: str = "train") -> list[Problem]:
    """`n` problems of `split` ('train' | 'test' | 'any'), deterministic in (task, n, seed, split)."""
    if split not in ("train", "test", "any"):
        raise ConfigError(f"split must be train, test or any, got {split!r}")
    rng = random.Random(f"nestlm.reasoning:{seed}:{split}")
    out = []
    while len(out) < n:
        k = rng.randint(*task.terms)
        p = Problem(tuple(rng.randrange(task.modulus) for _ in range(k)),
                    tuple(rng.choice(task.ops) for _ in range(k - 1)), task.digits)
        if split == "any" or _is_test(p, task.test_frac) == (split == "test"):
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------- text
def format_prompt(p: Problem) -> str:
    """What the model is given: the question and the opening think tag."""
    return f"Q:{p.expression}=?\n{THINK_START}"


def format_trace(p: Problem) -> str:
    """The worked steps, without tags: '3+5=8 8-9=9 9+2=1'."""
    return " ".join(f"{p.num(a)}{o}{p.num(t)}={p.num(r)}" for a, o, t, r in p.steps())


def format_answer(p: Problem) -> str:
    return f"{THINK_END}{ANSWER}{p.num(p.answer)}"


def format_example(p: Problem, keep: int | None = None) -> str:
    """prompt + trace + '</think>A:<answer>' (the end-of-sequence token is added by `encode_examples`);
    with `keep`, only the trace's first `keep` characters (thinking cut early, the answer still right)."""
    return format_prompt(p) + format_trace(p)[:keep] + format_answer(p)


def cut_points(problems: list[Problem], share: float, rng: random.Random) -> list[int | None]:
    """For training on early-cut thinking: per problem, None (the whole trace) or, with probability
    `share`, a cut position drawn uniformly in [0, len(trace))."""
    return [rng.randrange(len(format_trace(p))) if rng.random() < share else None for p in problems]


def parse_answer(text: str) -> int | None:
    """The integer after the first 'A:' that follows the last '</think>' (or anywhere if no tag); None if
    there is none."""
    tail = text[text.rfind(THINK_END) + len(THINK_END):] if THINK_END in text else text
    m = _ANSWER_RE.search(tail)
    return int(m.group(1)) if m else None


def score(p: Problem, generated: str) -> bool:
    """Whether the generated text (the answer phase, or prompt + trace + answer) holds the right answer."""
    return parse_answer(generated) == p.answer


# ---------------------------------------------------------------------------------------------- tokens
def encode_examples(problems: list[Problem], tok, seq_len: int | None = None,
                    keep: list[int | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows for a byte-level (or any `encode`-able) tokenizer: ids [n, T] and a loss mask [n, T]
    that is 1 on the tokens to predict (trace, tags, answer, <eos>), 0 on the question and the padding.

    Row i is `<bos> prompt trace </think>A:n <eos>` padded with <pad> to T = seq_len (or the longest row).
    The mask marks targets: mask[i, j] = 1 means ids[i, j] is predicted from ids[i, :j].
    `keep[i]` (when given and not None): only the first keep[i] characters of problem i's trace, then
    '</think>A:n' with the right answer: thinking cut early, as budget control cuts it."""
    rows, masks = [], []
    for i, p in enumerate(problems):
        prompt = tok.encode(format_prompt(p), bos=True)
        rest = tok.encode(format_trace(p)[: None if keep is None else keep[i]] + format_answer(p), eos=True)
        rows.append(prompt + rest)
        masks.append([0] * len(prompt) + [1] * len(rest))
    width = max(len(r) for r in rows) if seq_len is None else seq_len
    if max(len(r) for r in rows) > width:
        raise ConfigError(f"an example has {max(len(r) for r in rows)} tokens > seq_len {width}")
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, mask
