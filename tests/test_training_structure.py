"""The training stage stays readable: no function in cgf_fhe/training is 80 lines or longer, and the CLI uses
no private name of the API."""
import ast
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[1] / "cgf_fhe" / "training"
MAX_LINES = 80


def test_no_training_function_reaches_80_lines():
    sizes = []
    for path in sorted(TRAINING.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1, f"{path.name}:{node.name}"))
    longest = max(sizes)
    assert longest[0] < MAX_LINES, longest


def test_training_cli_imports_no_private_api_name():
    tree = ast.parse((TRAINING / "cli.py").read_text())
    private = [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               for a in n.names if a.name.startswith("_") and "api" in (n.module or "")]
    assert private == []
