"""softprompt's benchmarks against PEFT, side by side in one run: ``python -m research.run [--quick] [--out DIR]``.

See ``docs/benchmarks.md`` for what is measured, how, and the latest full run.
"""
