// GENERATED from the registry (fastopt/specs.py: `kernel`, `variants`) by
// fastopt/backends/cuda_source.py family_header(); do not edit. setup.py regenerates it on every build
// (python -m fastopt.backends.cuda_source --write); tests/test_family_table.py checks it is current.
//
// The elementwise kernel families: each has its math and its functor <Family>Op<M, V> (ops.cuh) in
// <family>.cuh. A family's kind (the CPU kernel index) is its position in this table.
#pragma once
#include "sgd.cuh"
#include "adagrad.cuh"
#include "rmsprop.cuh"
#include "adam.cuh"
#include "nadam.cuh"
#include "radam.cuh"
#include "adabelief.cuh"
#include "lion.cuh"
#include "adamax.cuh"
#include "adadelta.cuh"
#include "rprop.cuh"
#include "asgd.cuh"
#include "yogi.cuh"
#include "sfsgd.cuh"
#include "sfadamw.cuh"
#include "adan.cuh"
#include "lars.cuh"
#include "average.cuh"

#define FASTOPT_FAMILY_COUNT 18

// X(kind, family, functor, variant): one row per compiled variant (kernels/cpu/cpu_loops.hpp)
#define FASTOPT_UPDATE_VARIANTS(X) \
    X(0, sgd, SgdOp, 0) \
    X(0, sgd, SgdOp, 1) \
    X(0, sgd, SgdOp, 3) \
    X(0, sgd, SgdOp, 5) \
    X(0, sgd, SgdOp, 7) \
    X(1, adagrad, AdagradOp, 0) \
    X(2, rmsprop, RmspropOp, 0) \
    X(2, rmsprop, RmspropOp, 1) \
    X(2, rmsprop, RmspropOp, 2) \
    X(2, rmsprop, RmspropOp, 3) \
    X(3, adam, AdamOp, 0) \
    X(3, adam, AdamOp, 1) \
    X(4, nadam, NadamOp, 0) \
    X(5, radam, RadamOp, 0) \
    X(5, radam, RadamOp, 1) \
    X(6, adabelief, AdabeliefOp, 0) \
    X(7, lion, LionOp, 0) \
    X(8, adamax, AdamaxOp, 0) \
    X(9, adadelta, AdadeltaOp, 0) \
    X(10, rprop, RpropOp, 0) \
    X(11, asgd, AsgdOp, 0) \
    X(12, yogi, YogiOp, 0) \
    X(13, sfsgd, SfsgdOp, 0) \
    X(14, sfadamw, SfadamwOp, 0) \
    X(15, adan, AdanOp, 0) \
    X(16, lars, LarsOp, 0) \
    X(16, lars, LarsOp, 1) \
    X(16, lars, LarsOp, 3) \
    X(17, average, AverageOp, 0) \
    X(17, average, AverageOp, 1) \
    X(17, average, AverageOp, 2) \


// The CUDA entry points fo_<family>_v<variant>[_multi]: update.cu defines FO_UPDATE_ENTRIES and
// FO_PER_TENSOR_ENTRIES (a family reading a number per tensor: the multi entry only) and then includes
// this file (the same rows as above).
#ifdef FO_UPDATE_ENTRIES
FO_UPDATE_ENTRIES(0, sgd, SgdOp, 0)
FO_UPDATE_ENTRIES(0, sgd, SgdOp, 1)
FO_UPDATE_ENTRIES(0, sgd, SgdOp, 3)
FO_UPDATE_ENTRIES(0, sgd, SgdOp, 5)
FO_UPDATE_ENTRIES(0, sgd, SgdOp, 7)
FO_UPDATE_ENTRIES(1, adagrad, AdagradOp, 0)
FO_UPDATE_ENTRIES(2, rmsprop, RmspropOp, 0)
FO_UPDATE_ENTRIES(2, rmsprop, RmspropOp, 1)
FO_UPDATE_ENTRIES(2, rmsprop, RmspropOp, 2)
FO_UPDATE_ENTRIES(2, rmsprop, RmspropOp, 3)
FO_UPDATE_ENTRIES(3, adam, AdamOp, 0)
FO_UPDATE_ENTRIES(3, adam, AdamOp, 1)
FO_UPDATE_ENTRIES(4, nadam, NadamOp, 0)
FO_UPDATE_ENTRIES(5, radam, RadamOp, 0)
FO_UPDATE_ENTRIES(5, radam, RadamOp, 1)
FO_UPDATE_ENTRIES(6, adabelief, AdabeliefOp, 0)
FO_UPDATE_ENTRIES(7, lion, LionOp, 0)
FO_UPDATE_ENTRIES(8, adamax, AdamaxOp, 0)
FO_UPDATE_ENTRIES(9, adadelta, AdadeltaOp, 0)
FO_UPDATE_ENTRIES(10, rprop, RpropOp, 0)
FO_UPDATE_ENTRIES(11, asgd, AsgdOp, 0)
FO_UPDATE_ENTRIES(12, yogi, YogiOp, 0)
FO_UPDATE_ENTRIES(13, sfsgd, SfsgdOp, 0)
FO_UPDATE_ENTRIES(14, sfadamw, SfadamwOp, 0)
FO_UPDATE_ENTRIES(15, adan, AdanOp, 0)
FO_PER_TENSOR_ENTRIES(16, lars, LarsOp, 0)
FO_PER_TENSOR_ENTRIES(16, lars, LarsOp, 1)
FO_PER_TENSOR_ENTRIES(16, lars, LarsOp, 3)
FO_UPDATE_ENTRIES(17, average, AverageOp, 0)
FO_UPDATE_ENTRIES(17, average, AverageOp, 1)
FO_UPDATE_ENTRIES(17, average, AverageOp, 2)
#endif

// The 8-bit state entry points fo_<family>_v<variant>_q8 of the families an optimizer runs with
// state_dtype="int8" (the last argument: 1 when the functor reads a number per tensor): update.cu defines
// FO_INT8_ENTRIES in the int8 modules (FASTOPT_STATE 4) only.
#ifdef FO_INT8_ENTRIES
FO_INT8_ENTRIES(0, sgd, SgdOp, 0, 0)
FO_INT8_ENTRIES(0, sgd, SgdOp, 1, 0)
FO_INT8_ENTRIES(0, sgd, SgdOp, 3, 0)
FO_INT8_ENTRIES(0, sgd, SgdOp, 5, 0)
FO_INT8_ENTRIES(0, sgd, SgdOp, 7, 0)
FO_INT8_ENTRIES(1, adagrad, AdagradOp, 0, 0)
FO_INT8_ENTRIES(2, rmsprop, RmspropOp, 0, 0)
FO_INT8_ENTRIES(2, rmsprop, RmspropOp, 1, 0)
FO_INT8_ENTRIES(2, rmsprop, RmspropOp, 2, 0)
FO_INT8_ENTRIES(2, rmsprop, RmspropOp, 3, 0)
FO_INT8_ENTRIES(3, adam, AdamOp, 0, 0)
FO_INT8_ENTRIES(3, adam, AdamOp, 1, 0)
FO_INT8_ENTRIES(4, nadam, NadamOp, 0, 0)
FO_INT8_ENTRIES(5, radam, RadamOp, 0, 0)
FO_INT8_ENTRIES(5, radam, RadamOp, 1, 0)
FO_INT8_ENTRIES(6, adabelief, AdabeliefOp, 0, 0)
FO_INT8_ENTRIES(7, lion, LionOp, 0, 0)
FO_INT8_ENTRIES(8, adamax, AdamaxOp, 0, 0)
FO_INT8_ENTRIES(9, adadelta, AdadeltaOp, 0, 0)
FO_INT8_ENTRIES(10, rprop, RpropOp, 0, 0)
FO_INT8_ENTRIES(12, yogi, YogiOp, 0, 0)
FO_INT8_ENTRIES(15, adan, AdanOp, 0, 0)
FO_INT8_ENTRIES(16, lars, LarsOp, 0, 1)
FO_INT8_ENTRIES(16, lars, LarsOp, 1, 1)
FO_INT8_ENTRIES(16, lars, LarsOp, 3, 1)
#endif

// The two-phase families (spec.two_phase): a per-tensor reduction between phase 1 (the states, and
// the norms of p and of the update: <family>_moments_math) and phase 2 (the step scaled by
// <family>_trust_ratio: <family>_apply_math), all in <family>.cuh. X(index, family, params struct):
// the CPU loops (kernels/cpu/cpu_loops.hpp) give each two kinds after the elementwise families.
#include "lamb.cuh"
#define FASTOPT_TWO_PHASE_COUNT 1
#define FASTOPT_TWO_PHASE_FAMILIES(X) \
    X(0, lamb, LambParams) \


// Their CUDA entry points fo_<family>_moments_multi, _trust, _apply_multi: update.cu defines
// FO_TWO_PHASE_ENTRIES(family, params struct) and includes this.
#ifdef FO_TWO_PHASE_ENTRIES
FO_TWO_PHASE_ENTRIES(lamb, LambParams)
#endif
