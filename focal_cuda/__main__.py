"""``python -m focal_cuda``: print how this installation was built."""

import json

import focal_cuda

if __name__ == "__main__":
    print(json.dumps(focal_cuda.build_info(), indent=2))
