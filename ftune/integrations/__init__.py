"""Where ftune reaches into upstream libraries (transformers, peft, TRL, bitsandbytes).

Each module here names the versions its patches were checked against; tests/test_integrations.py
holds a contract test per patch that fails with a clear message when an upgrade moves what it
relies on.
"""
