"""`gptoss infer`: continue a prompt with a trained run; text streams to stdout, a summary line to stderr."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .options import (
    CheckpointOpt,
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    JsonLinesOpt,
    PenaltyOpt,
    ReadRunOpt,
    SeedOpt,
    StopOpt,
    TemperatureOpt,
    ThreadsOpt,
    TokensOpt,
    TopKOpt,
    TopPOpt,
)

PromptArg = Annotated[str | None, typer.Argument(help="Text to continue.", show_default=False)]
PromptOpt = Annotated[str | None, typer.Option("--prompt", "-p", help="Text to continue (instead of the argument).")]
PromptsFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--prompts-file", help="One prompt per line (blank lines skipped), generated as one batch; - reads stdin."
    ),
]


def command(
    prompt: PromptArg = None,
    prompt_opt: PromptOpt = None,
    max_new_tokens: TokensOpt = None,
    run: ReadRunOpt = None,
    checkpoint: CheckpointOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    repetition_penalty: PenaltyOpt = None,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    prompts_file: PromptsFileOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    compile: CompileOpt = None,
    threads: ThreadsOpt = None,
    json: JsonLinesOpt = False,
) -> None:
    """Generate text with a trained run (default: the newest under ./runs).

    Sampling defaults come from the run config's infer section; options override them.

    Example: gptoss infer "GPT models are" -n 20 --run runs/demo
    """
    from ..infer.generate import infer
    from ..output import console
    from ..threads import set_threads

    prompts = _read_prompts(prompt, prompt_opt, prompts_file)
    set_threads(threads)
    stream = not json and len(prompts) == 1  # a batch prints whole completions, one after another
    echoed = []  # the prompt is echoed with the first text, so an error before it leaves stdout empty

    def on_text(row: int, chunk: str) -> None:
        if stream:
            sys.stdout.write(("" if echoed else prompts[0]) + chunk)
            sys.stdout.flush()
            echoed.append(True)

    def on_compile(why: str) -> None:
        console.print(
            f"compiling the decode step (torch.compile, {why}): seconds when inductor's cache has it, "
            "up to a minute or more the first time",
            highlight=False,
        )

    result = infer(
        prompts,
        run=run,
        checkpoint=checkpoint,
        device=device,
        dtype=dtype,
        on_text=on_text,
        compile_decode=compile,
        on_compile=on_compile,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
    )
    _write_completions(result.completions, json=json, stream=stream, echoed=bool(echoed))
    _summary_line(result)


def _read_prompts(prompt: str | None, prompt_opt: str | None, prompts_file: Path | None) -> list[str]:
    """The prompts of the arguments and of --prompts-file (one per line); text that is not UTF-8 is one error
    line naming where it is."""
    from ..data.tokenizer import check_text, decode_utf8
    from ..errors import GptossError

    prompts = [check_text(p, "prompt") for p in (prompt, prompt_opt) if p is not None]
    if prompts_file is not None:
        try:
            if str(prompts_file) != "-":
                text = decode_utf8(prompts_file.read_bytes(), f"--prompts-file {prompts_file}")
            elif hasattr(sys.stdin, "buffer"):  # bytes: a line that is not UTF-8 is named, not mangled
                text = decode_utf8(sys.stdin.buffer.read(), "--prompts-file -")
            else:
                text = check_text(sys.stdin.read(), "--prompts-file -")
            lines = text.splitlines()
        except OSError as err:
            raise GptossError(f"--prompts-file {prompts_file}: cannot read ({err.strerror or err})") from None
        prompts += [line for line in lines if line.strip()]
        if not prompts:
            raise GptossError(f"--prompts-file {prompts_file}: no prompts in it (one per line)")
    if not prompts:
        raise GptossError('no prompt: gptoss infer "GPT models are" -n 20 (or --prompt, --prompts-file)')
    return prompts


def _write_completions(completions, *, json: bool, stream: bool, echoed: bool) -> None:
    """stdout: JSON Lines, the end of a streamed completion, or each completion of a batch whole."""
    import json as jsonlib

    for i, c in enumerate(completions):
        if json:
            record = {
                "prompt": c.prompt,
                "completion": c.text,
                "prompt_tokens": c.prompt_tokens,
                "new_tokens": c.new_tokens,
                "stop_reason": c.stop_reason,
            }
            sys.stdout.write(jsonlib.dumps(record) + "\n")
        elif stream:
            sys.stdout.write(("" if echoed else c.prompt) + "\n")
        else:
            sys.stdout.write(("\n" if i else "") + c.prompt + c.text + "\n")
    sys.stdout.flush()


def _summary_line(result) -> None:
    """stderr: the context warning and one line of counts, speeds, memory and what ran where."""
    from ..output import console, warn
    from ..threads import describe

    s, loaded = result.stats, result.run
    if s.context_limited:
        warn(
            f"stopped at the model's context length ({loaded.config.model.max_context_length} tokens, "
            "model.max_context_length): shorten the prompt for a longer continuation"
        )
    peak = f"peak memory {s.peak_bytes / 2**20:,.1f} MiB ({s.memory_label})" if s.peak_bytes else "peak memory n/a"
    decode = f"decode {s.decode_tokens_per_s:.1f} tokens/s" if s.decode_tokens_per_s else "decode n/a"
    decode += f" {s.compile_choice}" if s.compile_choice else ""
    if s.compile_s:
        decode = f"compile {s.compile_s:.1f} s | {decode}"
    batch = f" | batch {s.batch}" if s.batch > 1 else ""
    console.print(
        f"prompt tokens {s.prompt_tokens} | new tokens {s.new_tokens} | prefill {s.prefill_s * 1e3:.1f} ms | "
        f"{decode} | {peak} | {loaded.checkpoint} on {loaded.device.type} {loaded.dtype_name}{batch} | "
        f"{describe()}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
