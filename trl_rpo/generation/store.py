"""The resumable store of a generation run, in its output folder: the settings record (`generation_config.json`),
one shard per process (`shards/rank-<k>.jsonl`, appended and flushed after every batch) and the merged
`completions.jsonl`. A resumed run must have the recorded settings; a prompt whose samples are all in a shard is not
sampled again; a damaged line or record is reported with the file, never used."""

import json
from pathlib import Path

from accelerate.logging import get_logger

from ..data import describe_rows, prompt_key
from ..files import write_json, write_text
from ..version import __version__


logger = get_logger(__name__)

COMPLETIONS_FILE = "completions.jsonl"
GENERATION_CONFIG_FILE = "generation_config.json"
SHARDS_FOLDER = "shards"
# What a resumed run must share with the run that wrote the output folder.
RESUME_KEYS = (
    "model", "revision", "adapter", "dtype", "temperature", "top_p", "top_k", "max_new_tokens", "num_generations",
    "seed", "backend", "num_prompts", "prompts_digest",
)  # fmt: skip


def check_resumable(output_dir: Path, record: dict) -> None:
    path = output_dir / GENERATION_CONFIG_FILE
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        recorded = error
    if not isinstance(recorded, dict):
        raise ValueError(
            f"The generation record {path} is damaged ({recorded}), so nothing says which settings made the samples "
            f"in {output_dir}. Restore the file, or move {output_dir} away to sample again."
        )
    differing = [key for key in RESUME_KEYS if recorded.get(key) != record[key]]
    if differing:
        described = "; ".join(
            "different prompts"
            if key == "prompts_digest"
            else f"{key}={recorded.get(key)!r} there, {record[key]!r} now"
            for key in differing
        )
        raise ValueError(
            f"{output_dir} holds a generation run with other settings ({described}). Resume it with the same settings "
            "and prompts, or pass another `output_dir` to start a new run."
        )


def write_generation_config(output_dir: Path, record: dict) -> None:

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / GENERATION_CONFIG_FILE
    if not path.is_file():
        write_json(path, {**record, "trl_rpo_version": __version__})


def _shard_lines(shard: Path, prompt_keys: list[str], num_generations: int):
    """The rows of a shard, in order. A line cut by an interruption, or one that is not a sample of these prompts
    (damaged bytes, another program's output), is skipped and counted: its prompt is sampled again."""
    damaged = 0
    for line in shard.read_bytes().splitlines():
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if _is_sample(row, prompt_keys, num_generations):
            yield row
        elif line.strip():
            damaged += 1
    if damaged:
        logger.warning(
            f"Skipped {damaged} damaged line(s) of {shard} (not JSON, or not a sample of these prompts): the prompts "
            "they belonged to are sampled again."
        )


def _is_sample(row, prompt_keys: list[str], num_generations: int) -> bool:
    if not isinstance(row, dict) or "completion" not in row or not isinstance(row.get("finished"), bool):
        return False
    index, sample = row.get("prompt_index"), row.get("sample_index")
    if not (isinstance(index, int) and isinstance(sample, int)):
        return False
    return 0 <= index < len(prompt_keys) and 0 <= sample < num_generations and prompt_key(row) == prompt_keys[index]


def complete_groups(output_dir: Path, prompts: list[dict], num_generations: int) -> dict[int, list[dict]]:
    """
    The rows of each prompt whose samples are all in the shards. A prompt's samples are written together, in order, so
    a complete group is a run of consecutive rows with sample indices 0 … n-1; the rows a cut write left behind form a
    shorter run, and that prompt is sampled again (its new rows come later in the same shard).
    """
    keys = [prompt_key(row) for row in prompts]
    complete: dict[int, list[dict]] = {}
    for shard in sorted((output_dir / SHARDS_FOLDER).glob("*.jsonl")):
        run: list[dict] = []
        for row in _shard_lines(shard, keys, num_generations):
            if run and (row["prompt_index"], row["sample_index"]) != (run[0]["prompt_index"], len(run)):
                run = []
            if run or row["sample_index"] == 0:
                run.append(row)
            if len(run) == num_generations:
                complete.setdefault(run[0]["prompt_index"], run)
                run = []
    return complete


def merge_shards(output_dir: Path, prompts: list[dict], num_generations: int) -> None:
    num_prompts = len(prompts)
    complete = complete_groups(output_dir, prompts, num_generations)
    missing = [i for i in range(num_prompts) if i not in complete]
    if missing:
        raise RuntimeError(f"Prompts {describe_rows(missing)} have no complete samples in {output_dir / 'shards'}.")
    lines = (json.dumps(row, ensure_ascii=False) + "\n" for i in range(num_prompts) for row in complete[i])
    write_text(output_dir / COMPLETIONS_FILE, "".join(lines))
    logger.info(f"Wrote {num_prompts * num_generations} rows to {output_dir / COMPLETIONS_FILE}.")


def open_shard(output_dir: Path, rank: int):
    """This process's shard, opened for appending after cutting a line an interruption left unfinished."""
    path = output_dir / SHARDS_FOLDER / f"rank-{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as file:
                file.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")
