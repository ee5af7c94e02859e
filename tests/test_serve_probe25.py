"""Probe 25 of ``deltatune serve`` against vLLM's OpenAI server: the cost of a streamed answer's detokenisation. vLLM
steps tokenizers' ``DecodeStream`` (a few tokens decoded per new token); the engine decoded a row's whole answer
again at every token, so a long answer's text cost O(n^2) tokens decoded, in the one thread that drives the model
(3,600 tokens: 2.5 s of decoding on a laptop core, for each row). No model runs."""

from __future__ import annotations

import pytest

from deltatune.serve.detok import Detokenizer


def _vllm_steps(tok, prompt: list[int], answer: list[int]) -> list[str]:
    """vLLM's FastIncrementalDetokenizer: DecodeStream primed with the prompt, the answer's text after each token."""
    from tokenizers.decoders import DecodeStream

    stream, text, out = DecodeStream(skip_special_tokens=True), "", []
    for t in prompt:
        stream.step(tok._tokenizer, t)
    for t in answer:
        text += stream.step(tok._tokenizer, t) or ""
        out.append(text)
    return out


class _Counting:
    """A tokenizer whose ``decode`` counts the ids it is given."""

    def __init__(self, tok) -> None:
        self.tok, self.decoded = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kwargs)


def _steps(tok, prompt: list[int], answer: list[int]) -> list[str]:
    detok = Detokenizer(tok, prompt)
    return [detok.text(answer[: i + 1]) for i in range(len(answer))]


@pytest.fixture(scope="module")
def smol():
    from tiny import smollm2_tokenizer

    return smollm2_tokenizer()


def test_a_long_answer_is_detokenised_in_linear_time_as_vllms_decode_stream(smol):
    """An answer of 600 byte-level tokens (words, 日本語, 😀 split over several tokens, café): its text after each
    token is vLLM's DecodeStream's (the text held while it ends inside a character), and the ids decoded for all the
    steps stay within a few per token; before, every step decoded the whole answer (600 * 601 / 2 = 180,300 ids)."""
    answer = smol(" say 日本語 and 😀 at the café, then go on." * 60, add_special_tokens=False)["input_ids"][:600]
    prompt = smol("Tell me:")["input_ids"]
    counting = _Counting(smol)
    got = _steps(counting, prompt, answer)
    vllm = _vllm_steps(smol, prompt, answer)
    # a text ending inside a character is held back by the engine (Engine._advance), as DecodeStream holds it
    whole = [(g, v) for g, v in zip(got, vllm, strict=True) if not g.endswith("\ufffd")]
    assert [g for g, _ in whole] == [v for _, v in whole]
    assert got[-1] == smol.decode(answer) and len(answer) // 2 < len(whole) < len(answer)
    assert counting.decoded < 20 * len(answer)


def test_a_sentencepiece_answer_keeps_its_first_space_step_by_step_in_linear_time():
    """A Llama-2-style decoder (Metaspace's "▁", the first decoded token's space stripped): the answer after the
    prompt starts with its space at every step, as vLLM's primed DecodeStream gives it, whatever the window the new
    text is read from; the decoding stays linear."""
    from test_serve_probe11 import _metaspace

    tok = _metaspace()
    answer = [5, 6, 4, 7, 3, 5, 4] * 40
    counting = _Counting(tok)
    assert _steps(counting, [1, 3], answer) == _vllm_steps(tok, [1, 3], answer)
    assert counting.decoded < 20 * len(answer)


def _vllm_penalties(logits, prompt: list[int], output: list[int], rep: float, freq: float, pres: float):
    """vLLM's apply_penalties (model_executor/layers/utils.py) for one row: the repetition penalty over the prompt's
    and the output's tokens (a positive logit divided, the others multiplied), then the frequency penalty times each
    token's count in the output and the presence penalty once per token in it, subtracted."""
    import torch

    vocab = logits.shape[-1]
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab).to(logits.dtype)
    mask = torch.bincount(torch.tensor(prompt, dtype=torch.long), minlength=vocab) > 0
    penalties = torch.where(mask | (counts > 0), torch.tensor(rep), torch.tensor(1.0))
    logits = torch.where(logits > 0, logits / penalties, logits * penalties)
    logits = logits - freq * counts
    return logits - pres * (counts > 0).to(logits.dtype)


def test_a_rows_penalties_are_vllms_and_cost_its_new_tokens_alone(monkeypatch):
    """A row's repetition, frequency and presence penalties at each step of a 300-token answer (a 200-token prompt,
    repeated tokens, negative and positive logits) are vLLM's apply_penalties'; the ids turned into tensors for them
    stay the prompt's once and each new token's. Before, every step rebuilt them from the whole prompt and answer (a
    Python set and a host tensor of prompt + answer per row per step: O(n^2) host work over a long answer, in the one
    thread that drives the model; 300 steps: 115,442 ids)."""
    from types import SimpleNamespace

    import torch

    from deltatune.serve import sampling

    converted = [0]

    class _Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def tensor(data, *args, **kwargs):
            converted[0] += len(data) if isinstance(data, list) else 1
            return torch.tensor(data, *args, **kwargs)

    monkeypatch.setattr(sampling, "torch", _Torch())
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 500, (200,), generator=g).tolist()
    answer = torch.randint(0, 400, (300,), generator=g).tolist()
    r = SimpleNamespace(prompt_ids=prompt, output_ids=[], repetition_penalty=1.3, frequency_penalty=0.4,
                        presence_penalty=-0.7)  # fmt: skip
    for i, t in enumerate(answer):
        logits = torch.randn(1000, generator=g) * 4
        if i % 50 == 0:
            want = _vllm_penalties(logits, prompt, r.output_ids, 1.3, 0.4, -0.7)
            torch.testing.assert_close(sampling.adjusted(logits, r), want, rtol=0, atol=1e-6)
        else:
            sampling.adjusted(logits, r)
        r.output_ids.append(t)
    assert converted[0] <= len(prompt) + len(answer)


def test_a_run_of_skipped_eos_tokens_costs_no_decoding_as_text_stays_vllms(smol):
    """Under ignore_eos a skipped EOS gives no text: a window of them decoded to nothing, so every such step decoded
    the whole answer again (words then 590 EOS: 186,111 ids decoded; runs of 7 EOS between words: 53,243). The window
    now starts at the last tokens that gave text (vLLM's prefix offset) and the EOS, which decode drops, cost nothing;
    the text after each token is still vLLM's DecodeStream's."""
    eos, prompt = smol.eos_token_id, smol("Hi")["input_ids"]
    words = smol(" the cat sat on the mat and", add_special_tokens=False)["input_ids"]
    for answer in (words[:10] + [eos] * 590, ([eos] * 7 + words[:1]) * 75):
        counting = _Counting(smol)
        assert _steps(counting, prompt, answer) == _vllm_steps(smol, prompt, answer)
        assert counting.decoded < 20 * len(answer)


def _row(**settings):
    from deltatune.serve.engine import Request

    return Request(adapter="base", max_tokens=8, emit=lambda *_: None, **{"prompt_ids": [0], **settings})


def test_a_rows_penalties_follow_its_prompt_and_answer_when_they_are_replaced():
    """The penalty state kept on the row (Request.penalties) was checked against the prompt's and the answer's
    lengths alone: a row whose answer or prompt is another list of the same length kept the old one's counts
    ([0, -2, 0, 0] where vLLM's apply_penalties gives [0, 0, -1, -1]). Now it follows the lists the row holds."""
    import torch

    from deltatune.serve.sampling import adjusted

    r = _row(frequency_penalty=1.0, output_ids=[1, 1])
    adjusted(torch.zeros(4), r)
    r.output_ids = [2, 3]
    want = _vllm_penalties(torch.zeros(4), [0], [2, 3], 1.0, 1.0, 0.0)
    torch.testing.assert_close(adjusted(torch.zeros(4), r), want, rtol=0, atol=0)
    r = _row(repetition_penalty=2.0, output_ids=[1])
    adjusted(torch.ones(4), r)
    r.prompt_ids = [3]
    want = _vllm_penalties(torch.ones(4), [3], [1], 2.0, 0.0, 0.0)
    torch.testing.assert_close(adjusted(torch.ones(4), r), want, rtol=0, atol=0)


def test_a_repetition_penalty_works_on_the_rows_tokens_not_the_vocabulary(monkeypatch):
    """A generation config's repetition_penalty (1.05) over a 152k vocabulary: each step took two nested torch.where
    over the whole vocabulary (20 times the time before the penalties were kept on the row); now the penalty is
    computed over the row's tokens alone, scattered back, and the logits stay vLLM's apply_penalties'."""
    import torch

    from deltatune.serve import sampling

    touched = [0]

    class _Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def where(cond, *args):
            touched[0] += cond.numel()
            return torch.where(cond, *args)

    monkeypatch.setattr(sampling, "torch", _Torch())
    g = torch.Generator().manual_seed(1)
    prompt, answer = torch.randint(0, 151936, (50,), generator=g).tolist(), [7, 9, 7, 151935]
    r = _row(prompt_ids=prompt, frequency_penalty=0.5)
    gen = type("Gen", (), {"repetition_penalty": 1.05})()
    for t in answer:
        logits = torch.randn(151936, generator=g) * 4
        want = _vllm_penalties(logits, prompt, r.output_ids, 1.05, 0.5 if r.output_ids else 0.0, 0.0)
        torch.testing.assert_close(sampling.adjusted(logits, r, gen), want, rtol=0, atol=1e-6)
        r.output_ids.append(t)
    assert touched[0] <= len(answer) * (len(prompt) + len(answer))


def test_a_bf16_rows_frequency_penalty_counts_past_256_as_vllms():
    """The counts were kept in the logits' dtype and grown one at a time: bf16 stopped at 256 (a token seen 300 times
    penalised -256, vLLM's apply_penalties -300). Counted in float32, then cast as vLLM casts its counts."""
    import torch

    from deltatune.serve.sampling import adjusted

    r = _row(frequency_penalty=1.0, output_ids=[])
    for _ in range(300):
        r.output_ids.append(1)
        got = adjusted(torch.zeros(4, dtype=torch.bfloat16), r)
    want = _vllm_penalties(torch.zeros(4, dtype=torch.bfloat16), [0], r.output_ids, 1.0, 1.0, 0.0)
    torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=0, atol=0)  # (its reference's factor is fp32)
    assert got[1].item() == -300.0
