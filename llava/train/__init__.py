"""ECSO as an SFT data engine (the paper's second use of ECSO) and LoRA fine-tuning on its data.

``llava.train.sft_data`` turns a benchmark's (image, query) pairs into LLaVA-format SFT data with ECSO's safe
answers; ``llava.train.lora`` fine-tunes a LLaVA model on such data (``pip install -e ".[train]"``);
``llava.train.compare`` compares the base and the fine-tuned model's direct answers. See docs/training.md.
"""
