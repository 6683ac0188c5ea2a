"""transformers' GPT-2 quick-start, with jaxlm: load GPT-2, encode a prompt, `generate(max_length=50)`, decode.

    python examples/hello.py            # gpt2 from the Hugging Face hub (downloaded once)
    python examples/hello.py PATH       # an HF GPT-2 directory or a jaxlm checkpoint

Greedy, as transformers' `model.generate(inputs, max_length=50, num_return_sequences=1)` is for gpt2.
"""

import sys

import jaxlm

if __name__ == "__main__":
    source = sys.argv[1] if len(sys.argv) > 1 else "gpt2"
    config, params = jaxlm.load(source)
    tokenizer = jaxlm.GPT2Tokenizer()
    inputs = tokenizer.encode("Hello, how are you?")
    outputs = jaxlm.generate(params, config, [inputs], max_length=50, num_return_sequences=1, do_sample=False)
    print(tokenizer.decode(inputs + outputs[0]))
