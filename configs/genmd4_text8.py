"""GenMD4 on text8 (the MD4 paper's state-dependent masking; <= 1.34 BPC at full scale)."""

from configs import text8


def get_config():
  c = text8.get_config()
  c.model_type = "genmd4"
  return c
