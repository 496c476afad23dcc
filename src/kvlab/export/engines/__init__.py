"""Engine drivers: standalone scripts run with an engine's own venv python (``.venv-vllm``,
``.venv-llamacpp``) as subprocesses. Each reads one JSON request on stdin and prints one JSON answer as
the last line of stdout. They import nothing from kvlab (kvlab is not installed in those venvs)."""
