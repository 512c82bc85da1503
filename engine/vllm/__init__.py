"""The stock vLLM kit: the launcher, tunegate's vLLM plugin, tuned LoRA kernel configs and the
kernel tuner (`tunegate engine tune-lora`)."""
