"""Local Spatius Motion Server simulator: console token API and ingress WebSocket."""

from relay.motion_sim.animation import (
    FPS,
    KEYFRAME_SIZE,
    AnimationBatch,
    Keyframe,
    KeyframeGenerator,
    decode_animation,
    encode_animation,
    keyframes_for_audio,
)
from relay.motion_sim.server import (
    SIM_KEY,
    FaultKind,
    FaultRule,
    MotionSim,
    SimConfig,
    SimStats,
    bound_port,
    create_app,
    run_forever,
    serve,
)

__all__ = [
    "FPS",
    "KEYFRAME_SIZE",
    "SIM_KEY",
    "AnimationBatch",
    "FaultKind",
    "FaultRule",
    "Keyframe",
    "KeyframeGenerator",
    "MotionSim",
    "SimConfig",
    "SimStats",
    "bound_port",
    "create_app",
    "decode_animation",
    "encode_animation",
    "keyframes_for_audio",
    "run_forever",
    "serve",
]
