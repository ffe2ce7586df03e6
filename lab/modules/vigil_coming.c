// SPDX-License-Identifier: GPL-2.0
/* Lab attack: vigil_going claiming to be loading instead of unloading, as a
 * new instance of itself would be, to make its rewritten text its reference. */
#define VIGIL_CLAIMED_STATE MODULE_STATE_COMING
#include "vigil_going.c"
