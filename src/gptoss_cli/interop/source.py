"""Reading a model directory someone else made (for `gptoss import`): only its own files, of a bounded size.

A file is read only when it is a regular file whose real path (links followed) lies inside the directory,
so a `chat_template.jinja` linked to a system file, or a shard named `../../x` in an index, is refused
rather than copied into the run. Two layouts legitimately reach outside: openai's `original/` takes its
tokenizer from the directory above, and a Hugging Face hub cache snapshot (`.../snapshots/REV/`) links every
file to the repository's `blobs/`; those places count as inside. Text files (configs, tokenizer, template)
are read up to MAX_TEXT_BYTES, so a link to /dev/zero or a runaway file cannot fill memory; safetensors are
memory-mapped by their library and checked against the shapes config.json implies.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import GptossError

MAX_TEXT_BYTES = 64 * 2**20  # o200k's tokenizer.json is ~27 MB; configs and templates are kilobytes


class SourceDir:
    def __init__(self, root: Path, openai_layout: bool = False):
        self.root = Path(root)
        base = self.root.resolve()
        bases = [base.parent] if openai_layout else [base]
        self.inside = list(bases)
        for b in bases:
            if b.parent.name == "snapshots":  # huggingface_hub's cache: snapshots/REV/NAME -> ../../blobs/HASH
                self.inside.append(b.parent.parent / "blobs")

    def _contains(self, real: Path) -> bool:
        return any(real == d or real.is_relative_to(d) for d in self.inside)

    def file(self, path: Path) -> Path | None:
        """`path` if it is a regular file inside the directory; None if it does not exist; an error for a link
        that leaves the directory or for something that is not a file."""
        path = Path(path)
        if not path.exists() and not path.is_symlink():
            return None
        real = path.resolve()
        if not self._contains(real):
            raise GptossError(
                f"{path}: leads outside {self.root} (to {real}); refused: copy the file into the directory "
                "if it belongs to the model"
            )
        if not real.is_file():
            raise GptossError(f"{path}: not a regular file")
        return path

    def text(self, path: Path, what: str = "file") -> str | None:
        """The UTF-8 text of `path` (None if it does not exist), read up to MAX_TEXT_BYTES."""
        if self.file(path) is None:
            return None
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_BYTES + 1)
        if len(data) > MAX_TEXT_BYTES:
            raise GptossError(f"{path}: larger than {MAX_TEXT_BYTES // 2**20} MiB, too large for a {what}")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise GptossError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
