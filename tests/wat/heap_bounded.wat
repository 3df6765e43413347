;; A reusable module that says where its writes end: it exports __heap_base
;; and wd_heap_next (the address of its allocator's next free byte), as the
;; C SDK does. Warden then puts back only the memory below the heap's end.
;; Each evaluation counts in a static (below __heap_base), in a fresh
;; allocation (in the heap) and at 60000 (above the heap, which the module
;; promised not to write: the count there survives, which shows that only
;; the memory below was put back). Denies if a count below the heap's end
;; survived or warden_init's mark is gone; allows with rule "above_heap_kept"
;; once the count above the heap has survived.
(module
  (memory (export "memory") 1)
  (global (export "__heap_base") i32 (i32.const 4096))
  (global (export "wd_heap_next") i32 (i32.const 16))
  (data (i32.const 1024) "{\"action\":\"allow\",\"rule\":\"\",\"reason\":\"\"}")
  (data (i32.const 1280) "{\"action\":\"allow\",\"rule\":\"above_heap_kept\",\"reason\":\"\"}")
  (data (i32.const 2048) "{\"action\":\"deny\",\"rule\":\"state_survived\",\"reason\":\"saw an earlier call\"}")
  (data (i32.const 3072) "{\"action\":\"deny\",\"rule\":\"init_lost\",\"reason\":\"warden_init's mark is gone\"}")
  (func $alloc (export "warden_alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (i32.load (i32.const 16)))
    (if (i32.eqz (local.get $p)) (then (local.set $p (i32.const 4096))))
    (i32.store (i32.const 16) (i32.add (local.get $p) (local.get $len)))
    (local.get $p))
  (func (export "warden_init") (param i32 i32)
    (i32.store (i32.const 600) (i32.const 7)))
  (func (export "warden_evaluate") (param $ptr i32) (param $len i32) (result i64)
    (local $cell i32)
    (local.set $cell (call $alloc (i32.const 4)))
    (i32.store (local.get $cell) (i32.add (i32.load (local.get $cell)) (i32.const 1)))
    (i32.store (i32.const 512) (i32.add (i32.load (i32.const 512)) (i32.const 1)))
    (i32.store (i32.const 60000) (i32.add (i32.load (i32.const 60000)) (i32.const 1)))
    (if (i32.ne (i32.load (i32.const 600)) (i32.const 7))
      (then (return (i64.or (i64.shl (i64.const 3072) (i64.const 32)) (i64.const 74)))))
    (if (i32.or (i32.gt_u (i32.load (i32.const 512)) (i32.const 1))
                (i32.gt_u (i32.load (local.get $cell)) (i32.const 1)))
      (then (return (i64.or (i64.shl (i64.const 2048) (i64.const 32)) (i64.const 72)))))
    (if (result i64) (i32.gt_u (i32.load (i32.const 60000)) (i32.const 1))
      (then (i64.or (i64.shl (i64.const 1280) (i64.const 32)) (i64.const 55)))
      (else (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const 40))))))
