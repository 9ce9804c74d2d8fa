"""edgec.runtime: run and benchmark ONNX models with ONNX Runtime. Needs only onnxruntime and numpy (no torch,
no onnx), so it runs on devices and lean CI boxes. See runtime/README.md for the API and the JSON schema."""
from edgec.runtime.bench import Amount, BenchResult, benchmark, parse_amount
from edgec.runtime.gate import SCHEMA, Breach, Budget, check_budgets, check_regression, load_baseline, parse_budget
from edgec.runtime.providers import available as available_providers
from edgec.runtime.providers import list_providers
from edgec.runtime.report import document, record

__all__ = ["Amount", "BenchResult", "Breach", "Budget", "SCHEMA", "available_providers", "benchmark",
           "check_budgets", "check_regression", "document", "list_providers", "load_baseline", "parse_amount",
           "parse_budget", "record"]
