"""An lm-evaluation-harness backend, ``dataeff``: any lm-eval task on a trained run or an ensemble of runs.

    import dataeff.lm_eval_adapter  # registers the name "dataeff"
    lm_eval.simple_evaluate(model="dataeff", model_args="run_dir=runs/abc", tasks=["hellaswag"])

lm-eval's own command cannot import the backend, so the shell entry point is this module:
``python -m dataeff.lm_eval_adapter run --model dataeff --model_args "members=[runs/a,runs/b]" combine=prob --tasks piqa``
(in Python, ``model_args="members=runs/a,runs/b,combine=prob"`` works too).

Scoring is :mod:`dataeff.tasks`'s (its tokenization, end-of-document prefix and truncation), so a task run
here and by ``dataeff tasks`` gives the same log-likelihoods.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dataeff.errors import DataeffError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    raise DataeffError("dataeff.lm_eval_adapter needs lm-evaluation-harness: pip install lm-eval") from None

from dataeff.data.tokenizer import Tokenizer
from dataeff.eval.ensemble import load_ensemble
from dataeff.eval.tasks import encode_pairs, log_prob_fn, score_requests
from dataeff.train.dist import pick_device
from dataeff.train.rundir import load_model

DEFAULT_BATCH_SIZE = 32


@register_model("dataeff")
class DataeffLM(LM):
    """A run (``run_dir``) or an ensemble (``members``, combined by ``combine``: prob or logit) as an lm-eval LM."""

    def __init__(
        self,
        run_dir: str | None = None,
        members: str | Sequence[str] | None = None,
        combine: str = "prob",
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        if isinstance(members, str):
            members = [m.strip() for m in members.strip("[]").split(",") if m.strip()]
        if bool(run_dir) == bool(members):
            raise DataeffError("dataeff lm-eval model: give exactly one of run_dir=RUN and members=RUN1,RUN2")
        if combine not in ("prob", "logit"):
            raise DataeffError(f"dataeff lm-eval model: combine={combine!r} is not 'prob' or 'logit'")
        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command passes cuda:0 unless told otherwise; its HF backend falls back the same way.
            device = None
        self._device = pick_device(device or "auto")
        if members:
            ensemble = load_ensemble([str(m) for m in members], combine, str(self._device))  # type: ignore[arg-type]
            # members may name one ensemble.json: the tokenizer sits in its first member's run directory.
            runs = ensemble.names
            self.fn = log_prob_fn(ensemble)
        else:
            runs = [str(run_dir)]
            self.fn = log_prob_fn(load_model(runs[0], device=str(self._device)))
        self.tokenizer = Tokenizer.load(Path(runs[0]) / "tokenizer.json")
        # lm-eval's "auto" probes memory by trial; a fixed default is enough for models of this size.
        size = int(batch_size) if isinstance(batch_size, int) or str(batch_size).isdigit() else DEFAULT_BATCH_SIZE
        self.batch_size = min(size, max_batch_size) if max_batch_size else size
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> DataeffLM:
        """As lm-eval's, except that an item without ``=`` continues the previous value: ``members=a,b`` is two runs."""
        from lm_eval.utils import handle_arg_string

        args: dict[str, str] = {}
        key = None
        for part in (p.strip() for p in arg_string.split(",")):
            if "=" in part:
                key, value = (s.strip() for s in part.split("=", 1))
                args[key] = value
            elif part:
                if key is None:
                    raise DataeffError(f"dataeff lm-eval model_args {arg_string!r}: {part!r} is not key=value")
                args[key] += "," + part
        parsed = {k: v if k in ("run_dir", "members") else handle_arg_string(v) for k, v in args.items()}
        return cls.create_from_arg_obj(parsed, additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> DataeffLM:
        """As lm-eval's, except that model_args override the harness-wide settings (device, batch size) they repeat."""
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(arg_dict) - known)
        if unknown:
            raise DataeffError(f"dataeff lm-eval model_args: unknown key {unknown[0]!r}; valid: {', '.join(sorted(known))}")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = encode_pairs(self.tokenizer, [req.args for req in requests])
        return score_requests(self.fn, pairs, self.batch_size, progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood from its first token on, in disjoint windows of the model's context."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tokenizer.encode(text)
            for window in get_rolling_token_windows(tokens, self.tokenizer.eos_id, self.fn.seq_len, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owners, score_requests(self.fn, windows, self.batch_size, progress=not disable_tqdm),
                              strict=True):
            totals[i] += ll
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with ``do_sample``, temperature) continuations, cut at the first stop string.

        Generation runs past the model's context by keeping only its last ``seq_len`` tokens. Sampling draws
        from torch's global generator, which ``simple_evaluate`` seeds.
        """
        from lm_eval.models import utils

        out = []
        for req in tqdm(requests, desc="generating", disable=disable_tqdm):
            context, gen_kwargs = req.args
            kwargs = dict(utils.normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = utils.handle_stop_sequences(kwargs.pop("until"), eos=self.tokenizer.eos_token)
            max_new = int(kwargs.pop("max_gen_toks"))
            do_sample, temperature = kwargs.pop("do_sample", False), float(kwargs.pop("temperature", 0.0))
            if kwargs:
                raise DataeffError(f"dataeff lm-eval model: generation option {sorted(kwargs)[0]!r} is not supported")
            # Unlike scoring, the prompt keeps its trailing whitespace: the model continues after it.
            prompt = [self.tokenizer.eos_id, *self.tokenizer.encode(context)]
            text = self._generate(prompt, max_new, until, temperature if do_sample else 0.0)
            out.append(utils.postprocess_generated_text(text, until, None))
        return out

    @torch.inference_mode()
    def _generate(self, prompt: list[int], max_new: int, until: list[str], temperature: float) -> str:
        ids, new = list(prompt), []
        for _ in range(max_new):
            log_probs = self.fn(torch.tensor([ids[-self.fn.seq_len :]]))[0, -1].cpu()
            token = int(torch.multinomial((log_probs / temperature).softmax(-1), 1)) if temperature > 0 else int(log_probs.argmax())
            if token == self.tokenizer.eos_id:
                break
            ids.append(token)
            new.append(token)
            if any(stop in self.tokenizer.decode(new) for stop in until):
                break
        return self.tokenizer.decode(new)


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
