{
  "targets": [
    {
      "target_name": "seqpacket",
      "sources": ["native/seqpacket.c"],
      "cflags": ["-Wall", "-Wextra", "-Werror", "-O2"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
