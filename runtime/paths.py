"""Where relative paths point: the working directory first, then the recipe folder.

    config = resolve_path("./model_configs/meta-llama/Llama-3.2-1B")   # works from any working directory

The tier configs name the bundled assets (`./tokenizers/...`, `./model_configs/...`,
`./test_genomic_sequences.parquet`) relative to the recipe folder, so a run started elsewhere still finds them.
"""

from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parents[1]


def resolve_path(path: str | Path) -> Path:
    """A relative path is looked up in the working directory first, then in the recipe folder."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return RECIPE_DIR / path if (RECIPE_DIR / path).exists() else path


def looked_in() -> str:
    """Where `resolve_path` looks, for an error message: the working directory, and the recipe folder if other."""
    here = Path.cwd().resolve()
    return f"looked in {here}" if here == RECIPE_DIR.resolve() else f"looked in {here} and {RECIPE_DIR}"
