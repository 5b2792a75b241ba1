"""The demo model (issue 7): its synthetic data, tokenizer, trainer and evaluation.

Not part of the runtime package `herd`: the scripts in scripts/ import it (`from demo.data import ...`), and so
do the demo tests (pytest puts scripts/ on the path). The model they made ships as `herd.demo.MODEL_PATH`.
"""
