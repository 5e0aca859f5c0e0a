"""GenMD4 on OpenWebText with the MD4-S network."""

from configs import owt


def get_config():
  c = owt.get_config()
  c.model_type = "genmd4"
  return c
