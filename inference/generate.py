"""Same as the `ldm-generate` command: python inference/generate.py "a red car" --model DIR [options]."""

from ldm.generate import main

if __name__ == "__main__":
    main()
