"""tune-losses recipes, run with `tune run recipes/<name>.py --config ...` from the repository root.

torchtune installs a top-level package also named `recipes`; `tune run` imports ours as
`recipes.<name>`, so the repository root must come first on the import path (PYTHONPATH=., which
`source .venv/bin/activate` sets for the project's environment; see the README).
"""
