"""Engine replicas: the embedded transformers+peft server and the stock vLLM launcher."""
