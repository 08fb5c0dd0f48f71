"""The architecture suite's models (issue 19), each with the input shape it is exported at: timm's edge families
(classifiers at 224x224) and ultralytics' YOLO detectors from their own yaml (320x320, a multiple of their
32-pixel stride). One list for bench/arch_suite.py, bench/arch_models.py's factories and tests/test_arch.py."""

TIMM = ["mobilenetv2_050", "mobilenetv3_small_100", "mobilenetv4_conv_small", "efficientnet_b0", "efficientnet_lite0",
        "ghostnet_100", "repvit_m0_9", "fastvit_t8", "convnext_atto", "regnetx_002", "efficientvit_b0",
        "edgenext_xx_small", "mobilevit_xxs", "mobilevitv2_050", "levit_128s", "deit_tiny_patch16_224", "lcnet_050",
        "mnasnet_050"]
YOLO = {"yolov8n": "yolov8n.yaml", "yolov5nu": "yolov5nu.yaml"}  # name -> ultralytics' bundled config
SHAPES = {**{n: "1,3,224,224" for n in TIMM}, **{n: "1,3,320,320" for n in YOLO}}
