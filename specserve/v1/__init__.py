"""Generated protocol buffer and gRPC code of protos/specserve/v1/*.proto (package specserve.v1).

Do not edit the *_pb2* files: change the .proto and run protos/gen.sh.
"""
